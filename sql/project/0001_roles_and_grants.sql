-- Per-project bootstrap, run by the control connection's superuser/admin role inside the new
-- project database. Placeholders: {db}, {owner}, {readwrite}, {read} (quoted identifiers).
--
-- The scope table of the guide is enforced by PostgreSQL itself:
--   read      → SELECT only
--   readwrite → SELECT, INSERT, UPDATE (no DELETE, TRUNCATE, DDL)
--   owner     → owns the schema and every object in it: full DDL and DML
-- None of the roles is a member of another, so none can SET ROLE to a stronger one.
REVOKE ALL ON DATABASE {db} FROM PUBLIC;
GRANT CONNECT ON DATABASE {db} TO {owner}, {readwrite}, {read};
GRANT CREATE, TEMPORARY ON DATABASE {db} TO {owner};

REVOKE ALL ON SCHEMA public FROM PUBLIC;
ALTER SCHEMA public OWNER TO {owner};
GRANT USAGE ON SCHEMA public TO {readwrite}, {read};

-- Objects the owner creates later get the same grants (in every schema it creates, too).
ALTER DEFAULT PRIVILEGES FOR ROLE {owner} GRANT USAGE ON SCHEMAS TO {readwrite}, {read};
ALTER DEFAULT PRIVILEGES FOR ROLE {owner} GRANT SELECT ON TABLES TO {read};
ALTER DEFAULT PRIVILEGES FOR ROLE {owner} GRANT SELECT, INSERT, UPDATE ON TABLES TO {readwrite};
ALTER DEFAULT PRIVILEGES FOR ROLE {owner} GRANT SELECT ON SEQUENCES TO {read};
ALTER DEFAULT PRIVILEGES FOR ROLE {owner} GRANT USAGE, SELECT, UPDATE ON SEQUENCES TO {readwrite};
