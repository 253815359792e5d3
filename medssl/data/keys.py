"""The only place where sample-dictionary keys are spelled."""

IMAGE = "image"  # (C, *spatial) intensities
LABEL = "label"  # (1, *spatial) integer label map
COORDS = "coords"  # (D, *spatial) world position of every pixel/voxel in mm
VALID = "valid"  # (1, *spatial) 1 where the pixel lies inside the source scan
INFO = "info"  # (1, *spatial) information map (local grey-level entropy, bits)
SUBJECT = "subject"  # image key: the file name without its extension
