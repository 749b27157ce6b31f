"""Tests of the OTLP receiver, FLOPs attribution and the job-side report_flops helper."""
