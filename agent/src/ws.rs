//! The agent's end of the WebSocket once the HTTP upgrade is done: the socket I/O around
//! [`strait_schema::ws`], in the client role. tokio-tungstenite still dials and upgrades; after
//! that its stream is taken apart (the gateway says nothing before our `Hello`, so nothing it
//! read ahead is lost) and frames are read and written here.
//!
//! Why not tungstenite's stream: it copied every outgoing payload three times (our encode, its
//! copy into the write buffer, its masking pass) and every incoming one once more out of its read
//! buffer. Here a `Data` payload is masked on its one way into the write buffer, and an incoming
//! frame is read straight into the buffer it is handed on in (docs/benchmarks.md, fifteenth
//! round).

use bytes::{Bytes, BytesMut};
use strait_schema::ws::{self, Kind, Message, Role, SocketReader};
use strait_schema::{data_padding, Data, DATA_HEAD_LEN};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::Error;

/// What a read asks the socket for at least, when no larger frame is pending.
const READ_CHUNK: usize = 32 * 1024;

/// Reads the gateway's messages ([`SocketReader`] in the client role, its errors in the agent's
/// terms). Cancel-safe: a `next` dropped by a `select!` loses nothing.
pub(crate) struct WsReader<R>(SocketReader<R>);

impl<R: AsyncRead + Unpin> WsReader<R> {
    /// Refuses messages over `max_message` bytes.
    pub(crate) fn new(io: R, max_message: usize) -> Self {
        WsReader(SocketReader::new(
            io,
            Role::Client,
            max_message,
            BytesMut::new(),
            READ_CHUNK,
        ))
    }

    /// The limit once the gateway has announced its own.
    pub(crate) fn set_max_message(&mut self, max_message: usize) {
        self.0.set_max_message(max_message);
    }

    /// The next message, `None` when the gateway closed the TCP connection between messages.
    pub(crate) async fn next(&mut self) -> Result<Option<Message>, Error> {
        self.0.next_message().await.map_err(|e| match e.kind() {
            std::io::ErrorKind::InvalidData => Error::Protocol(format!("bad WebSocket frame from the gateway: {e}")),
            std::io::ErrorKind::UnexpectedEof => {
                Error::Connection("the gateway closed the connection mid-frame".into())
            }
            _ => Error::Connection(format!("reading from the gateway failed: {e}")),
        })
    }
}

/// What the agent sends to the gateway, in order.
#[derive(Debug)]
pub(crate) enum Outgoing {
    /// One encoded frame.
    Frame(Bytes),
    /// A `Data` frame, encoded as it is masked into the write buffer.
    Data(Data),
    /// Answers a WebSocket ping.
    Pong(Bytes),
    /// Starts the closing handshake.
    Close,
}

impl Outgoing {
    /// Bytes of the WebSocket payload (the encoded frame).
    pub(crate) fn len(&self) -> usize {
        match self {
            Outgoing::Frame(b) | Outgoing::Pong(b) => b.len(),
            Outgoing::Data(d) => DATA_HEAD_LEN + d.bytes.len() + data_padding(d.bytes.len()),
            Outgoing::Close => 0,
        }
    }
}

/// Writes masked frames to the gateway through one buffer that is reused.
pub(crate) struct WsWriter<W> {
    io: W,
    buf: BytesMut,
}

impl<W: AsyncWrite + Unpin> WsWriter<W> {
    pub(crate) fn new(io: W) -> Self {
        WsWriter {
            io,
            buf: BytesMut::with_capacity(READ_CHUNK),
        }
    }

    /// Bytes buffered and not yet written.
    pub(crate) fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Frames `msg` into the buffer, masked with a fresh random key.
    pub(crate) fn push(&mut self, msg: &Outgoing) {
        let key: [u8; 4] = rand::random();
        match msg {
            Outgoing::Frame(b) => ws::put_frame(&mut self.buf, Kind::Binary, b, Some(key)),
            Outgoing::Data(d) => ws::put_data(&mut self.buf, d, key),
            Outgoing::Pong(b) => ws::put_frame(&mut self.buf, Kind::Pong, b, Some(key)),
            Outgoing::Close => ws::put_frame(&mut self.buf, Kind::Close, &[], Some(key)),
        }
    }

    /// Writes out what is buffered, without flushing the stream (TLS keeps its record open).
    pub(crate) async fn write_out(&mut self) -> std::io::Result<()> {
        self.io.write_all(&self.buf).await?;
        self.buf.clear();
        Ok(())
    }

    /// Writes out what is buffered and flushes the stream.
    pub(crate) async fn flush(&mut self) -> std::io::Result<()> {
        self.write_out().await?;
        self.io.flush().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A gateway that closes the connection mid-frame is a connection error, not a clean end.
    #[tokio::test]
    async fn a_frame_cut_short_is_a_connection_error() {
        let mut wire = BytesMut::new();
        ws::put_frame(&mut wire, Kind::Ping, b"hi", None);
        wire.extend_from_slice(&[0x82, 10, 1, 2]); // a frame cut short
        let mut r = WsReader::new(&wire[..], 1 << 20);
        assert_eq!(r.next().await.unwrap(), Some(Message::Ping(Bytes::from_static(b"hi"))));
        match r.next().await {
            Err(Error::Connection(why)) => assert!(why.contains("mid-frame"), "{why}"),
            other => panic!("got {other:?}"),
        }
    }

    /// A masked frame is a gateway that does not speak the protocol: a protocol error.
    #[tokio::test]
    async fn a_masked_frame_from_the_gateway_is_a_protocol_error() {
        let mut wire = BytesMut::new();
        ws::put_frame(&mut wire, Kind::Binary, b"abc", Some([1, 2, 3, 4]));
        let mut r = WsReader::new(&wire[..], 1 << 20);
        match r.next().await {
            Err(Error::Protocol(why)) => assert!(why.contains("masked frame from a server"), "{why}"),
            other => panic!("got {other:?}"),
        }
    }

    /// Whatever the writer buffers, the gateway's end reads back as the same messages.
    #[tokio::test]
    async fn what_the_writer_sends_a_server_reads_back() {
        let data = Data {
            stream: strait_schema::StreamId(3),
            bytes: Bytes::from(vec![5u8; 300]),
        };
        let mut w = WsWriter::new(Vec::new());
        w.push(&Outgoing::Frame(Bytes::from_static(b"frame")));
        w.push(&Outgoing::Data(data.clone()));
        w.push(&Outgoing::Pong(Bytes::from_static(b"p")));
        w.push(&Outgoing::Close);
        let framed = w.buffered();
        assert!(framed > 300, "four frames buffered: {framed}");
        w.flush().await.unwrap();
        assert_eq!(
            (w.buffered(), w.io.len()),
            (0, framed),
            "all of it written, nothing kept"
        );
        let mut server = ws::Reader::new(Role::Server, 1 << 20);
        let mut buf = BytesMut::from(&w.io[..]);
        let mut got = Vec::new();
        while let Some(m) = server.next(&mut buf).unwrap() {
            got.push(m);
        }
        assert_eq!(
            got,
            vec![
                Message::Binary(Bytes::from_static(b"frame")),
                Message::Binary(Bytes::from(strait_schema::encode(&strait_schema::Frame::Data(data)))),
                Message::Pong,
                Message::Close(None),
            ]
        );
    }
}
