"""Runtime utilities shared by pipelines and frontends: CudaBuffer, CUDAGraph, calibration cache."""
