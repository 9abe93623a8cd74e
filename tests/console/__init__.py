"""Tests of the console: its pure parts, the REST API against the emulated API server, the UI in
Chromium."""
