//! Mora's networks on candle, each built from the config files the
//! reference library writes (transformers, sentence-transformers,
//! diffusers) in the forms its current and previous major versions write.
//!
//! - [`lm_config`] reads configs key by key: a key that changes the network
//!   and that Mora cannot honour is an error naming the file and the key,
//!   never a default; it also reads a decoder's `config.json` and
//!   `generation_config.json`;
//! - [`embed`] is the sentence encoders (BERT, XLM-RoBERTa, ModernBERT) with
//!   sentence-transformers' pooling;
//! - [`decoder`] is the llama family and GPT-2;
//! - [`image`] is Stable Diffusion: text encoders, UNet, VAE, schedulers and
//!   the pipeline that runs them prompt to pixels;
//! - [`lora`] reads LoRA adapters (PEFT, diffusers, Kohya) and applies
//!   them over a base's weights without writing to the base;
//! - [`synth`] writes deterministic random-weight checkpoints of every
//!   family in the layouts the reference libraries read, for tests and
//!   benchmarks;
//! - [`threads`] settles, once per process, how candle's CPU kernels use
//!   the cores.
//!
//! The crate knows nothing of workflows, of the daemon or of how weights
//! reach it: every network is built on a candle `VarBuilder`, whatever backs
//! it (a lent segment, lent GPU memory, files).

pub mod decoder;
pub mod embed;
pub mod image;
pub mod lm_config;
pub mod lora;
pub mod synth;
pub mod threads;
