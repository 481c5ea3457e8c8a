"""The one-command demo (``make run``): bff, a mock OpenID Provider and an echo API, on loopback."""
