"""Reference models the passes are proven on."""
