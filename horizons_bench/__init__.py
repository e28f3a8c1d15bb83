"""`horizons bench`: end-to-end benchmarks and fault injection against the real system.

Every benchmark drives real Kafka traffic through real consumer hosts (`horizons consume`
subprocesses) into a fresh DuckDB file, measures from the outside (broker offsets,
process RSS, an SMTP sink), prints a table and writes JSON under ``var/bench/``.
Throughput figures are put next to two references measured in the same run on the same
topics: a bare confluent-kafka consume loop and Kafka's own ConsumerPerformance.
"""
