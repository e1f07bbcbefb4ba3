"""The duplexd message bus: wire types, codec, sockets."""
