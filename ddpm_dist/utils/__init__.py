"""Small helpers every layer uses: atomic files, seed derivation, log lines."""
