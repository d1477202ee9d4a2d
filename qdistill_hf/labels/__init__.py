"""The label policy and the report scorers (rule-based and LLM) that turn reports into triage labels."""
