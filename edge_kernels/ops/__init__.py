"""One op per file: Triton kernels, their launchers, the autograd.Function and the public function."""
