"""The application database: connecting, migrations and the SQL the jobs share."""
