"""The tf.data input pipeline: sources, transforms, statistics, demo data."""
