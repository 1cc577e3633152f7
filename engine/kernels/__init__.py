"""Image compute kernels, apart from any process loop: crop and visual input, face to uint8 and
paste-back (image), JPEG splice encoding (splice), its bit-level numba code (jpeg_bits) and the
JPEG headers it reads (jpeg_layout). The avatars' shared-memory forms, the GPU worker, the
compositors and the front all use them, so they sit below all of them.

May import: (nothing in engine).
"""
