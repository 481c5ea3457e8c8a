"""bff: a backend-for-frontend session proxy (see README.md)."""
