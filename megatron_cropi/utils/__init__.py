"""Small shared helpers: ports, atomic file writes, hashing."""
