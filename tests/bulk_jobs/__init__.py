"""CSV loads as jobs, job records and the transaction log (Harper 4.7 shapes)."""
