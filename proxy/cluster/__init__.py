"""State shared by several gateway hosts: Redis."""
