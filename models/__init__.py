"""Training side: data, feature transform, embedding schemes, DLRM, training, evaluation."""
