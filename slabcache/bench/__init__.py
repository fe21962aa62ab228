"""Benchmarks behind `slabcache bench`: contenders, references, the suite."""
