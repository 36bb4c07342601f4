-- MySQL projects (issue 20): the engine a project's database runs on. Every existing project
-- is a PostgreSQL one. A MySQL project's database lives on the MySQL server (embedded MariaDB
-- or FLUXBASE_MYSQL_URL); its db_name is the database's name there.
ALTER TABLE fluxbase.projects
    ADD COLUMN engine text NOT NULL DEFAULT 'postgresql'
        CONSTRAINT projects_engine_check CHECK (engine IN ('postgresql', 'mysql'));
