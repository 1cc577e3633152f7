"""Image compute kernels, apart from any process loop: crop and visual input, face to uint8 and
paste-back (image), JPEG splice encoding (splice) and its bit-level numba code (jpeg_bits). Used by
the avatars' shared-memory forms, the GPU worker, the compositors and the front alike, so they sit
below all of them.

May import: (nothing in engine).
"""
