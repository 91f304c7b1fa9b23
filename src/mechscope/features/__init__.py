"""Feature circuits: transcoder sets, the frozen replacement model and attribution graphs."""
