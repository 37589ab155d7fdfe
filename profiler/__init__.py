"""Profiler: measures a vLLM server (or the GPU with torch) and fits a twin profile; torch micro-benchmarks of adapter families."""
