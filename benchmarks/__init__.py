"""Side-by-side benchmarks of trainctl against the tools users would pick instead."""
