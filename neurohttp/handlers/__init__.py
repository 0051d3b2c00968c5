"""Route handlers: Request in, Response out; no protocol details here."""
