"""NeuroHTTP: a pre-fork HTTP/1.1 server for AI APIs."""

__version__ = "0.1.0"
SERVER_NAME = f"NeuroHTTP/{__version__}"
