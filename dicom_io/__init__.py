"""DICOM input and output: series reading and validation, conversion, SEG and SR writers, senders."""
