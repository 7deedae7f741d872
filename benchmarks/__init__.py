"""asv benchmarks for convfast (see README "Benchmarks"); the layer suite lives in layers.py."""
