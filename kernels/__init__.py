"""Triton kernels for sokd, installed as the subpackage `sokd.kernels`."""
