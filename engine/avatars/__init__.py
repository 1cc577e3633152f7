"""Avatars: the folder layout on disk and its checks (disk), the frames in shared memory in the full
(frames) and spliced (spliced) forms and a process's view of them (attached), the front's store
that loads and evicts them (store), and avatar import from a video or a SyncTalk_2D dataset
(importer and staging; landmarks, face_track and crop_rects for the crop rectangles).

May import: engine.runtime, engine.kernels.
"""
