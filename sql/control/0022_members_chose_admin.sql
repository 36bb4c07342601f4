-- Whether a member chose the admin role: created the project, or accepted an invitation to it
-- as admin. Only such an admin can be the project's account (the owner its use of shared
-- resources counts against: SQL connections and answers, the memory watchdog's choice) and
-- counts the project against their own project quota. An admin made by another admin's role
-- change (PATCH /api/team) never agreed to carry the project (red team rt6 H1: an admin
-- promoted a viewer, left, and the viewer's account paid for the project and lost quota).
-- Admins before this migration are taken to have chosen it (nothing tells them apart).
ALTER TABLE fluxbase.members ADD COLUMN chose_admin boolean NOT NULL DEFAULT false;
UPDATE fluxbase.members SET chose_admin = true WHERE role = 'admin';
