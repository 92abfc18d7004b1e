"""Tools the test suite and the benchmarks share (as numpy.testing): nothing here runs in the product's commands."""
