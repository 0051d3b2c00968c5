"""Sans-IO HTTP/1.1: request parsing and response serialisation, no sockets."""
