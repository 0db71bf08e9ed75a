"""The sandbox payment provider: a standalone WSGI service that plays a third-party gateway (SPEC 5)."""
# Deliberately empty of imports: Django code imports .secrets and must not pull in psycopg2 or requests.
