"""Front-ends of the engine: programs that speak its protocol for other kinds of clients (web browsers)."""
