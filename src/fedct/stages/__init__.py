"""One thin module per DVC stage: parse inputs, call the packages, write outputs, track."""
