"""What an operator does by hand, beside the running platform: look at and reset a
group's stored offsets, list and replay dead letters. Each action that changes
something is confirmed first and recorded in the audit trail."""
