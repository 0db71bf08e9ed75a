"""The transition log is append-only: the database itself refuses UPDATE and DELETE of its rows."""

from django.db import migrations

SQL = """
CREATE OR REPLACE FUNCTION orders_transition_append_only() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION 'orders_ordertransition is append-only (% refused)', TG_OP;
END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER orders_transition_append_only
    BEFORE UPDATE OR DELETE ON orders_ordertransition
    FOR EACH ROW EXECUTE FUNCTION orders_transition_append_only();
"""
REVERSE = """
DROP TRIGGER IF EXISTS orders_transition_append_only ON orders_ordertransition;
DROP FUNCTION IF EXISTS orders_transition_append_only();
"""


class Migration(migrations.Migration):
    dependencies = [("orders", "0001_initial")]
    operations = [migrations.RunSQL(SQL, REVERSE)]
