"""Input: tf.data pipelines (folders, TFDS, digits), PIL and TF preprocessing, augmentation."""
