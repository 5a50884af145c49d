# Strait tunnel protocol: one `Frame` per WebSocket binary message between agent and node, and the
# same frames wrapped in a `BusEnvelope` between nodes.
#
# The Rust types in `schema/src/frame.rs` are the source of truth; `schema/src/codec.rs` maps them
# to and from these structs and validates every field on the way in. The generated Rust code is
# committed as `schema/src/tunnel_capnp.rs` so builds do not need the `capnp` tool; a test in the
# crate regenerates it and fails when this file and the committed code drift apart.
#
# Evolution rules: never renumber or retype a field; add fields with new ordinals only. Enumerated
# codes travel as UInt16 wire values (not capnp enums) so that a value this build does not know is
# refused with a typed error naming the field, instead of a generic "not in schema" read error.

@0xaf0d7de6595722b1;

struct Frame {
  union {
    hello @0 :Hello;
    welcome @1 :Welcome;
    refused @2 :Refused;
    ping @3 :Ping;
    pong @4 :Pong;
    requestHead @5 :RequestHead;
    responseHead @6 :ResponseHead;
    streamOpen @7 :StreamOpen;
    data @8 :DataFrame;
    credit @9 :Credit;
    fin @10 :Fin;
    reset @11 :Reset;
    goAway @12 :GoAway;
    drain @13 :Drain;
  }
}

# Wire values of `ServiceKind` (the `kind` field of `ServiceDecl`).
const serviceKindHttp :UInt16 = 0;
const serviceKindTcp :UInt16 = 1;

struct ServiceDecl {
  name @0 :Text;     # "" for the default HTTP service, else a short id
  kind @1 :UInt16;   # serviceKindHttp | serviceKindTcp
}

struct Hello {
  agent @0 :Text;          # DNS label
  instanceId @1 :Text;     # short id
  keyId @2 :Text;          # short id
  timestampMs @3 :UInt64;
  nonce @4 :Data;          # exactly 16 bytes
  signature @5 :Data;      # exactly 32 bytes (HMAC-SHA256)
  version @6 :UInt16;
  capabilities @7 :List(Text);
  services @8 :List(ServiceDecl);
}

struct WireLimits {
  maxFrameBytes @0 :UInt32;
  maxDataBytes @1 :UInt32;
  streamWindow @2 :UInt32;
  maxStreams @3 :UInt32;
}

struct Welcome {
  nodeId @0 :Text;
  heartbeatMs @1 :UInt32;
  limits @2 :WireLimits;
  capabilities @3 :List(Text);
}

struct Refused {
  code @0 :UInt16;         # RefuseCode wire value
  message @1 :Text;
}

struct Ping {
  timestampMs @0 :UInt64;
}

struct Pong {
  timestampMs @0 :UInt64;
}

struct Header {
  name @0 :Text;           # lowercase token
  value @1 :Data;          # no CR, LF or NUL
}

struct RequestHead {
  stream @0 :UInt64;
  service @1 :Text;
  method @2 :Text;
  uri @3 :Text;
  headers @4 :List(Header);
  end @5 :Bool;            # no body follows: the head is also the caller's Fin
}

struct ResponseHead {
  stream @0 :UInt64;
  status @1 :UInt16;
  headers @2 :List(Header);
  end @3 :Bool;            # the response is complete: no Data or Fin follows
  body @4 :Data;           # with `end` only: the whole body (counts against the stream window).
                           # Agents send `end` only to nodes whose Welcome lists "inline-end".
}

struct StreamOpen {
  stream @0 :UInt64;
  service @1 :Text;        # a TCP service; with `http`, an HTTP service ("" = the default one)
  http @2 :Bool;           # carry one HTTP/1.1 connection as raw bytes: the agent dials the HTTP
                           # service, then answers with a ResponseHead (status 200, `host`: the
                           # local authority, `x-strait-path-prefix` when it has one) before any
                           # Data. Only to agents whose Hello lists "raw-http".
}

# Named `DataFrame` because a struct called `Data` would shadow the built-in `Data` type.
struct DataFrame {
  stream @0 :UInt64;
  bytes @1 :Data;
}

struct Credit {
  stream @0 :UInt64;
  bytes @1 :UInt32;
}

struct Fin {
  stream @0 :UInt64;
}

struct Reset {
  stream @0 :UInt64;
  code @1 :UInt16;         # ErrorCode wire value
  reason @2 :Text;
}

struct GoAway {
  reason @0 :Text;
}

# Agent -> node, on a carried HTTP connection (`StreamOpen` with `http`): the agent is shutting
# down, so the node sends no further request on this stream and ends it (`Fin`) once the exchange
# in flight is answered. Only to nodes whose Welcome lists "drain".
struct Drain {
  stream @0 :UInt64;
}

struct BusEnvelope {
  fromNode @0 :Text;
  toNode @1 :Text;
  seq @2 :UInt64;
  traceParent @3 :Text;    # "" or a W3C traceparent
  agent @4 :Text;          # DNS label
  epoch @5 :UInt64;
  frame @6 :Frame;
}
