"""contentfs's faces: the FUSE view of a store and the ``contentfs`` command line."""
