"""Fixtures shared by the tests and the benchmarks: tiny random models and generated media."""
