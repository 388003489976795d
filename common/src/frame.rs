//! Length-prefixed postcard frames, with optional file descriptors attached.
//!
//! A frame is a little-endian `u32` payload length followed by the payload,
//! a postcard encoding of one message. A length above
//! [`MAX_FRAME_BYTES`](crate::protocol::MAX_FRAME_BYTES) is refused before
//! anything is allocated. File descriptors travel as SCM_RIGHTS ancillary
//! data on the first bytes of the frame they belong to.
//!
//! The blocking functions here serve the short-lived clients; the daemon
//! reads and writes the same format with tokio.

use std::io::{self, IoSlice, IoSliceMut, Read};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;

use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use serde::{de::DeserializeOwned, Serialize};

use crate::protocol::MAX_FRAME_BYTES;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")]
    TooLarge { len: usize },
    #[error("malformed message: {0}")]
    Decode(#[from] postcard::Error),
    #[error("the peer closed the connection")]
    Closed,
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Encodes `msg` as a complete frame: length prefix and payload.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let mut buf = postcard::to_extend(msg, vec![0u8; 4])?;
    let len = buf.len() - 4;
    if len > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge { len });
    }
    buf[..4].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(buf)
}

/// Reads a frame's length prefix and checks it against the limit.
pub fn payload_len(prefix: [u8; 4]) -> Result<usize, FrameError> {
    let len = u32::from_le_bytes(prefix) as usize;
    if len > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge { len });
    }
    Ok(len)
}

/// Decodes one message from a frame's payload (without the length prefix).
/// Trailing bytes are an error: a frame holds exactly one message.
pub fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, FrameError> {
    let (msg, rest) = postcard::take_from_bytes(payload)?;
    if !rest.is_empty() {
        return Err(FrameError::Decode(postcard::Error::DeserializeBadEncoding));
    }
    Ok(msg)
}

/// Writes one frame, attaching `fds` (if any) to its first byte.
pub fn write_frame(stream: &UnixStream, frame: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), FrameError> {
    let mut sent = 0;
    if !fds.is_empty() {
        sent = send_with_fds(stream, frame, fds)?;
    }
    let mut rest = &frame[sent..];
    while !rest.is_empty() {
        let n = rustix::net::send(stream, rest, SendFlags::NOSIGNAL).map_err(io::Error::from)?;
        rest = &rest[n..];
    }
    Ok(())
}

/// Most descriptors one frame carries (a reader takes this many).
pub const MAX_FDS: usize = 4;

/// Sends a prefix of `bytes` (at least one byte) with `fds` attached (at
/// most [`MAX_FDS`]) and returns how many bytes went. Works on any stream
/// socket, blocking or not; on a non-blocking one it may fail with
/// `WouldBlock`, sending nothing.
pub fn send_with_fds(socket: impl AsFd, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<usize> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if fds.len() > MAX_FDS || !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::other(format!("cannot attach {} descriptors to one frame", fds.len())));
    }
    let n = sendmsg(socket, &[IoSlice::new(bytes)], &mut control, SendFlags::NOSIGNAL)?;
    Ok(n)
}

/// Reads one frame from a blocking stream, collecting every file descriptor
/// that arrives with it into `fds`.
pub fn read_frame(stream: &UnixStream, fds: &mut Vec<OwnedFd>) -> Result<Vec<u8>, FrameError> {
    let mut prefix = [0u8; 4];
    recv_exact(stream, &mut prefix, fds)?;
    let len = payload_len(prefix)?;
    let mut payload = vec![0u8; len];
    recv_exact(stream, &mut payload, fds)?;
    Ok(payload)
}

/// Reads one frame and decodes it.
pub fn read_message<T: DeserializeOwned>(stream: &UnixStream, fds: &mut Vec<OwnedFd>) -> Result<T, FrameError> {
    decode(&read_frame(stream, fds)?)
}

/// Encodes and writes one message.
pub fn write_message<T: Serialize>(stream: &UnixStream, msg: &T) -> Result<(), FrameError> {
    write_frame(stream, &encode(msg)?, &[])
}

fn recv_exact(stream: &UnixStream, mut buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> Result<(), FrameError> {
    while !buf.is_empty() {
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let msg = match recvmsg(stream, &mut [IoSliceMut::new(buf)], &mut control, RecvFlags::CMSG_CLOEXEC) {
            Ok(m) => m,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(FrameError::Io(e.into())),
        };
        for m in control.drain() {
            if let RecvAncillaryMessage::ScmRights(received) = m {
                fds.extend(received);
            }
        }
        if msg.bytes == 0 {
            return Err(FrameError::Closed);
        }
        buf = &mut buf[msg.bytes..];
    }
    Ok(())
}

/// Reads a frame from any byte stream that carries no descriptors.
pub fn read_plain_frame(mut r: impl Read) -> Result<Vec<u8>, FrameError> {
    let mut prefix = [0u8; 4];
    r.read_exact(&mut prefix).map_err(eof_is_closed)?;
    let mut payload = vec![0u8; payload_len(prefix)?];
    r.read_exact(&mut payload).map_err(eof_is_closed)?;
    Ok(payload)
}

fn eof_is_closed(e: io::Error) -> FrameError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        FrameError::Closed
    } else {
        FrameError::Io(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Hello, HelloReply, Request, HELLO_MAGIC};
    use std::io::Write;

    #[test]
    fn message_round_trips_through_a_frame() {
        let hello = Hello { magic: HELLO_MAGIC, version: 7, client: "test".into() };
        let frame = encode(&hello).unwrap();
        assert_eq!(u32::from_le_bytes(frame[..4].try_into().unwrap()) as usize, frame.len() - 4);
        let back: Hello = decode(&frame[4..]).unwrap();
        assert_eq!(back, hello);
    }

    #[test]
    fn oversized_length_prefix_is_refused_before_allocating() {
        let prefix = ((MAX_FRAME_BYTES + 1) as u32).to_le_bytes();
        assert!(matches!(payload_len(prefix), Err(FrameError::TooLarge { .. })));
        assert!(matches!(payload_len(u32::MAX.to_le_bytes()), Err(FrameError::TooLarge { .. })));
    }

    #[test]
    fn garbage_payload_is_a_decode_error_not_a_panic() {
        let garbage = [0xffu8; 32];
        assert!(decode::<Request>(&garbage).is_err());
        assert!(decode::<Hello>(&[]).is_err());
    }

    #[test]
    fn trailing_bytes_after_a_message_are_refused() {
        let mut frame = encode(&Request::List).unwrap();
        frame.push(0);
        assert!(decode::<Request>(&frame[4..]).is_err());
    }

    #[test]
    fn hello_reply_decodes_whatever_version_it_names() {
        // The handshake types are frozen, so a reply from any version decodes.
        let reply = HelloReply::version_mismatch(9, 1, 42);
        let frame = encode(&reply).unwrap();
        let back: HelloReply = decode(&frame[4..]).unwrap();
        assert!(!back.accepted);
        assert!(back.message.contains("daemon speaks protocol 9, client speaks 1: restart the daemon"));
    }

    #[test]
    fn descriptor_travels_with_its_frame() {
        let (a, b) = UnixStream::pair().unwrap();
        let (r, mut w) = std::io::pipe().unwrap();
        let frame = encode(&Request::List).unwrap();
        write_frame(&a, &frame, &[r.as_fd()]).unwrap();
        let mut fds = Vec::new();
        let payload = read_frame(&b, &mut fds).unwrap();
        assert_eq!(decode::<Request>(&payload).unwrap(), Request::List);
        assert_eq!(fds.len(), 1);
        // The received descriptor is the same pipe: bytes written reach it.
        w.write_all(b"x").unwrap();
        let mut got = [0u8; 1];
        let mut received = std::fs::File::from(fds.pop().unwrap());
        received.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"x");
    }

    #[test]
    fn closed_peer_is_reported_as_closed() {
        let (a, b) = UnixStream::pair().unwrap();
        drop(a);
        let mut fds = Vec::new();
        assert!(matches!(read_frame(&b, &mut fds), Err(FrameError::Closed)));
    }

    mod properties {
        use super::super::*;
        use crate::protocol::{Hello, HelloReply, Request, Response};
        use proptest::prelude::*;

        proptest! {
            /// Whatever bytes a peer sends, decoding answers Ok or Err: it never
            /// panics and never allocates past the frame.
            #[test]
            fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
                let _ = decode::<Request>(&bytes);
                let _ = decode::<Response>(&bytes);
                let _ = decode::<Hello>(&bytes);
                let _ = decode::<HelloReply>(&bytes);
            }

            #[test]
            fn a_length_prefix_is_accepted_exactly_up_to_the_limit(prefix in any::<[u8; 4]>()) {
                let len = u32::from_le_bytes(prefix) as usize;
                prop_assert_eq!(payload_len(prefix).is_ok(), len <= MAX_FRAME_BYTES);
            }

            #[test]
            fn requests_survive_the_wire(lease in any::<u64>(), name in ".{0,64}") {
                for r in [
                    Request::Release { lease },
                    Request::Evict { target: crate::protocol::Selector { name: name.clone(), dtype: None } },
                ] {
                    let frame = encode(&r).unwrap();
                    let len = payload_len(frame[..4].try_into().unwrap()).unwrap();
                    prop_assert_eq!(len, frame.len() - 4);
                    prop_assert_eq!(decode::<Request>(&frame[4..]).unwrap(), r);
                }
            }
        }
    }
}

