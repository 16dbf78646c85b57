"""Connected accounts: OAuth 2 grants of third-party providers, kept fresh and checked (issue 9)."""
