"""Image analysis: preprocessing, network architectures, inference, post-processing, measurements."""
