//! Team & invitations: the guide's shapes, every error, the last-admin rule, and the role matrix
//! (each member role and key scope against each endpoint family).

use std::time::Duration;

use serde_json::{json, Value};

use crate::support::poll::until;
use crate::support::ws::{connect, recv, send, subscribe};
use crate::support::{pg, spawn_app, spawn_app_with, Fixture, TestApp};

/// A user who joined a project through an invitation.
struct Member {
    token: String,
    user_id: String,
    email: String,
}

async fn invite(app: &TestApp, by: &str, project: &str, email: &str, role: &str) -> (u16, Value) {
    app.call(
        "POST",
        "/api/team",
        Some(by),
        Some(json!({ "projectId": project, "email": email, "role": role })),
    )
    .await
}

async fn answer(app: &TestApp, token: &str, invite_id: &str, status: &str) -> (u16, Value) {
    app.call(
        "POST",
        "/api/team/invites/accept",
        Some(token),
        Some(json!({ "inviteId": invite_id, "status": status })),
    )
    .await
}

async fn team(app: &TestApp, by: &str, project: &str) -> (u16, Value) {
    app.call(
        "GET",
        &format!("/api/team?projectId={project}"),
        Some(by),
        None,
    )
    .await
}

async fn patch_role(
    app: &TestApp,
    by: &str,
    project: &str,
    user_id: &str,
    role: &str,
) -> (u16, Value) {
    app.call(
        "PATCH",
        "/api/team",
        Some(by),
        Some(json!({ "projectId": project, "userId": user_id, "role": role })),
    )
    .await
}

async fn remove(app: &TestApp, by: &str, project: &str, user_id: &str) -> (u16, Value) {
    app.call(
        "DELETE",
        &format!("/api/team?projectId={project}&userId={user_id}"),
        Some(by),
        None,
    )
    .await
}

/// Signs a user up, has the fixture's admin invite them with `role`, and accepts.
async fn join(app: &TestApp, f: &Fixture, role: &str) -> Member {
    let (token, user_id, email) = app.signup().await;
    let (status, body) = invite(app, &f.token, &f.project, &email, role).await;
    assert_eq!(status, 201, "{body}");
    let id = body["invite"]["id"].as_str().unwrap();
    let (status, body) = answer(app, &token, id, "accepted").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["member"]["role"], role);
    Member {
        token,
        user_id,
        email,
    }
}

fn assert_error(status: u16, body: &Value, want_status: u16, code: &str) {
    assert_eq!(status, want_status, "{body}");
    assert_eq!(body["success"], false, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
}

async fn admins_of(app: &TestApp, f: &Fixture) -> Vec<String> {
    members_where(app, f, |m| m["role"] == "admin").await
}

/// The members `GET /api/team` marks as owners.
async fn owners_of(app: &TestApp, f: &Fixture) -> Vec<String> {
    members_where(app, f, |m| m["owner"] == true).await
}

async fn members_where(app: &TestApp, f: &Fixture, keep: impl Fn(&Value) -> bool) -> Vec<String> {
    let (_, body) = team(app, &f.admin, &f.project).await;
    body["members"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| keep(m))
        .map(|m| m["userId"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn team_listing_has_the_guides_shape_for_members_and_invites() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    let (status, body) = team(&app, &f.token, &f.project).await;
    assert_eq!(status, 200, "{body}");
    let members = body["members"].as_array().unwrap();
    assert_eq!(members.len(), 1);
    let me = &members[0];
    assert_eq!(me["userId"], f.user_id.as_str());
    assert_eq!(me["email"], f.email.as_str());
    assert_eq!(me["displayName"], "Test");
    assert_eq!(me["role"], "admin");
    assert_eq!(me["owner"], true, "the creator owns the project");
    assert!(me["joinedAt"].as_str().unwrap().contains('T'));
    assert_eq!(body["invites"], json!([]));

    let (_, _, bob) = app.signup().await;
    let (status, sent) = invite(&app, &f.token, &f.project, &bob, "developer").await;
    assert_eq!(status, 201, "{sent}");
    assert_eq!(sent["success"], true);
    let inv = &sent["invite"];
    assert!(inv["id"].as_str().unwrap().starts_with("inv_"), "{inv}");
    assert_eq!(inv["email"], bob.as_str());
    assert_eq!(inv["role"], "developer");
    assert_eq!(inv["status"], "pending");

    // The admin key sees the same.
    let (status, body) = team(&app, &f.admin, &f.project).await;
    assert_eq!(status, 200, "{body}");
    let invites = body["invites"].as_array().unwrap();
    assert_eq!(invites.len(), 1);
    let keys: Vec<&str> = invites[0]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    // The guide's four, `status`, and `expiresAt` and `answerable` (red team rt13).
    assert_eq!(keys.len(), 7, "{keys:?}");
    for k in [
        "id",
        "email",
        "role",
        "invitedAt",
        "status",
        "expiresAt",
        "answerable",
    ] {
        assert!(keys.contains(&k), "{k} missing in {keys:?}");
    }
    assert_eq!(invites[0], *inv);
    // The guide's five fields, and `owner` (whether the member is one the project counts for:
    // the dashboard offers no removal of the last).
    let keys = body["members"][0].as_object().unwrap().len();
    assert_eq!(keys, 6, "{body}");
}

#[tokio::test]
async fn invitations_need_a_registered_account_and_compare_emails_in_any_case() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    let (status, body) = invite(
        &app,
        &f.token,
        &f.project,
        "nobody-here@example.com",
        "viewer",
    )
    .await;
    assert_error(status, &body, 404, "USER_NOT_FOUND");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("nobody-here@example.com"));

    let (token, user_id, email) = app.signup().await;
    let (status, sent) = invite(&app, &f.token, &f.project, &email.to_uppercase(), "viewer").await;
    assert_eq!(status, 201, "{sent}");
    // The account's own spelling is kept.
    assert_eq!(sent["invite"]["email"], email.as_str());
    let id = sent["invite"]["id"].as_str().unwrap().to_string();

    // The invitee discovers it through /api/auth/me.
    let (status, me) = app.call("GET", "/api/auth/me", Some(&token), None).await;
    assert_eq!(status, 200, "{me}");
    assert_eq!(me["projects"], json!([]));
    assert_eq!(me["invites"].as_array().unwrap().len(), 1, "{me}");
    assert_eq!(me["invites"][0]["id"], id.as_str());
    assert_eq!(me["invites"][0]["projectId"], f.project.as_str());
    assert_eq!(me["invites"][0]["projectName"], "test");
    assert_eq!(me["invites"][0]["role"], "viewer");

    // Until accepted, the project does not exist for them.
    let (status, body) = app
        .call(
            "POST",
            "/api/execute-sql",
            Some(&token),
            Some(json!({ "projectId": f.project, "query": "SELECT 1" })),
        )
        .await;
    assert_error(status, &body, 404, "PROJECT_NOT_FOUND");

    let (status, body) = answer(&app, &token, &id, "accepted").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["invite"]["status"], "accepted");
    assert_eq!(body["invite"]["projectId"], f.project.as_str());
    assert_eq!(body["member"]["userId"], user_id.as_str());
    assert_eq!(body["member"]["role"], "viewer");

    let (_, me) = app.call("GET", "/api/auth/me", Some(&token), None).await;
    assert_eq!(me["invites"], json!([]));
    assert_eq!(me["projects"][0]["id"], f.project.as_str());
    assert_eq!(me["projects"][0]["role"], "viewer");
    let (_, list) = team(&app, &f.token, &f.project).await;
    assert_eq!(list["members"].as_array().unwrap().len(), 2);
    assert_eq!(list["invites"][0]["status"], "accepted");
}

#[tokio::test]
async fn a_new_invitation_resets_an_earlier_pending_accepted_or_rejected_one() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    let (token, user_id, email) = app.signup().await;

    let (_, first) = invite(&app, &f.token, &f.project, &email, "viewer").await;
    let first_id = first["invite"]["id"].as_str().unwrap().to_string();
    // Pending → a new one (another case of the address) replaces it.
    let (status, second) = invite(&app, &f.admin, &f.project, &email.to_uppercase(), "admin").await;
    assert_eq!(status, 201, "{second}");
    let second_id = second["invite"]["id"].as_str().unwrap().to_string();
    assert_ne!(first_id, second_id);
    let (_, list) = team(&app, &f.token, &f.project).await;
    assert_eq!(list["invites"].as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list["invites"][0]["id"], second_id.as_str());
    assert_eq!(list["invites"][0]["role"], "admin");
    // The replaced invitation is gone.
    let (status, body) = answer(&app, &token, &first_id, "accepted").await;
    assert_error(status, &body, 404, "NOT_FOUND");

    // Rejected → a new one is pending again.
    let (status, body) = answer(&app, &token, &second_id, "rejected").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["invite"]["status"], "rejected");
    assert_eq!(body["member"], Value::Null);
    let (_, list) = team(&app, &f.token, &f.project).await;
    assert_eq!(list["invites"][0]["status"], "rejected");
    assert_eq!(list["members"].as_array().unwrap().len(), 1);
    let (_, third) = invite(&app, &f.token, &f.project, &email, "developer").await;
    assert_eq!(third["invite"]["status"], "pending");
    let third_id = third["invite"]["id"].as_str().unwrap().to_string();
    let (status, body) = answer(&app, &token, &third_id, "accepted").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["member"]["role"], "developer");

    // Accepted → pending again; accepting it sets the member's role to the new one.
    let (_, fourth) = invite(&app, &f.token, &f.project, &email, "viewer").await;
    assert_eq!(fourth["invite"]["status"], "pending");
    let (_, list) = team(&app, &f.token, &f.project).await;
    assert_eq!(list["invites"].as_array().unwrap().len(), 1, "{list}");
    let (status, body) = answer(
        &app,
        &token,
        fourth["invite"]["id"].as_str().unwrap(),
        "accepted",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (_, list) = team(&app, &f.token, &f.project).await;
    let member = list["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["userId"] == user_id.as_str())
        .unwrap()
        .clone();
    assert_eq!(member["role"], "viewer");
}

#[tokio::test]
async fn only_the_invitees_own_session_answers_an_invitation() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    let (token, _, email) = app.signup().await;
    let (other, _, _) = app.signup().await;
    let (_, sent) = invite(&app, &f.token, &f.project, &email, "developer").await;
    let id = sent["invite"]["id"].as_str().unwrap().to_string();

    let (status, body) = answer(&app, &other, &id, "accepted").await;
    assert_error(status, &body, 403, "INSUFFICIENT_PERMISSIONS");
    // Not even the inviting admin may answer for the invitee.
    let (status, body) = answer(&app, &f.token, &id, "accepted").await;
    assert_error(status, &body, 403, "INSUFFICIENT_PERMISSIONS");
    let (status, body) = answer(&app, &f.admin, &id, "accepted").await;
    assert_error(status, &body, 403, "SCOPE_MISMATCH");
    let (status, body) = app
        .call(
            "POST",
            "/api/team/invites/accept",
            None,
            Some(json!({ "inviteId": id, "status": "accepted" })),
        )
        .await;
    assert_error(status, &body, 401, "AUTH_REQUIRED");

    let (status, body) = answer(&app, &token, "inv_doesnotexist00", "accepted").await;
    assert_error(status, &body, 404, "NOT_FOUND");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("inviteId"));
    let (status, body) = answer(&app, &token, &id, "maybe").await;
    assert_error(status, &body, 400, "BAD_REQUEST");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("status"));
    for (bad, field) in [
        (json!({ "status": "accepted" }), "inviteId"),
        (json!({ "inviteId": 7, "status": "accepted" }), "inviteId"),
        (
            json!({ "inviteId": id, "status": "accepted", "role": "admin" }),
            "role",
        ),
        (json!({ "inviteId": id }), "status"),
    ] {
        let (status, body) = app
            .call(
                "POST",
                "/api/team/invites/accept",
                Some(&token),
                Some(bad.clone()),
            )
            .await;
        assert_error(status, &body, 400, "BAD_REQUEST");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .starts_with(field),
            "{bad}: {body}"
        );
    }
    // Still pending after all that.
    let (_, me) = app.call("GET", "/api/auth/me", Some(&token), None).await;
    assert_eq!(me["invites"][0]["status"], "pending");

    let (status, body) = answer(&app, &token, &id, "accepted").await;
    assert_eq!(status, 200, "{body}");
    for again in ["accepted", "rejected"] {
        let (status, body) = answer(&app, &token, &id, again).await;
        assert_error(status, &body, 409, "CONFLICT");
        assert!(body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("already accepted"));
    }
}

#[tokio::test]
async fn team_requests_are_validated_and_name_the_field() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    let dev = join(&app, &f, "developer").await;
    let cases = [
        (
            "POST",
            json!({ "projectId": f.project, "email": dev.email, "role": "owner" }),
            "role",
        ),
        (
            "POST",
            json!({ "projectId": f.project, "role": "viewer" }),
            "email",
        ),
        (
            "POST",
            json!({ "projectId": f.project, "email": ["x"], "role": "viewer" }),
            "email",
        ),
        (
            "POST",
            json!({ "projectId": f.project, "email": dev.email, "role": "viewer", "extra": 1 }),
            "extra",
        ),
        (
            "POST",
            json!({ "email": dev.email, "role": "viewer" }),
            "projectId",
        ),
        (
            "PATCH",
            json!({ "projectId": f.project, "userId": dev.user_id, "role": "root" }),
            "role",
        ),
        (
            "PATCH",
            json!({ "projectId": f.project, "userId": dev.user_id }),
            "role",
        ),
        (
            "PATCH",
            json!({ "projectId": f.project, "userId": 1, "role": "viewer" }),
            "userId",
        ),
    ];
    for (method, body, field) in cases {
        let (status, answer) = app
            .call(method, "/api/team", Some(&f.token), Some(body.clone()))
            .await;
        assert_error(status, &answer, 400, "BAD_REQUEST");
        assert!(
            answer["error"]["message"].as_str().unwrap().contains(field),
            "{method} {body}: {answer}"
        );
    }
    let (status, body) = app
        .call(
            "DELETE",
            &format!("/api/team?projectId={}", f.project),
            Some(&f.token),
            None,
        )
        .await;
    assert_error(status, &body, 400, "BAD_REQUEST");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("userId"));
    let (status, body) = app.call("GET", "/api/team", Some(&f.token), None).await;
    assert_error(status, &body, 400, "BAD_REQUEST");
    let (status, body) = app
        .call("PUT", "/api/team", Some(&f.token), Some(json!({})))
        .await;
    assert_error(status, &body, 405, "METHOD_NOT_ALLOWED");

    // Members that do not exist.
    let (_, outsider, _) = app.signup().await;
    let (status, body) = remove(&app, &f.token, &f.project, &outsider).await;
    assert_error(status, &body, 404, "NOT_FOUND");
    let (status, body) = patch_role(&app, &f.token, &f.project, &outsider, "viewer").await;
    assert_error(status, &body, 404, "NOT_FOUND");
    // Another project's key and a stranger's session.
    let g = app.fixture().await;
    let (status, body) = team(&app, &g.admin, &f.project).await;
    assert_error(status, &body, 403, "SCOPE_MISMATCH");
    let (status, body) = invite(&app, &g.token, &f.project, &dev.email, "viewer").await;
    assert_error(status, &body, 404, "PROJECT_NOT_FOUND");
    // Nothing changed.
    let (_, list) = team(&app, &f.token, &f.project).await;
    assert_eq!(list["members"].as_array().unwrap().len(), 2);
    assert_eq!(list["invites"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn non_admins_get_insufficient_permissions_on_every_team_endpoint() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    let viewer = join(&app, &f, "viewer").await;
    let developer = join(&app, &f, "developer").await;
    let (_, _, outsider) = app.signup().await;
    for token in [&viewer.token, &developer.token, &f.read, &f.readwrite] {
        for (status, body) in [
            team(&app, token, &f.project).await,
            invite(&app, token, &f.project, &outsider, "admin").await,
            patch_role(&app, token, &f.project, &viewer.user_id, "admin").await,
            remove(&app, token, &f.project, &viewer.user_id).await,
            remove(&app, token, &f.project, &f.user_id).await,
        ] {
            assert_error(status, &body, 403, "INSUFFICIENT_PERMISSIONS");
        }
    }
    // Nothing changed; the admin key may do all of it.
    let (status, list) = team(&app, &f.admin, &f.project).await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(list["members"].as_array().unwrap().len(), 3);
    assert_eq!(list["invites"].as_array().unwrap().len(), 2);
    let (status, body) = invite(&app, &f.admin, &f.project, &outsider, "viewer").await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = patch_role(&app, &f.admin, &f.project, &viewer.user_id, "admin").await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = remove(&app, &f.admin, &f.project, &developer.user_id).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn the_last_admin_can_be_neither_removed_nor_demoted() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    for by in [&f.token, &f.admin] {
        let (status, body) = remove(&app, by, &f.project, &f.user_id).await;
        assert_error(status, &body, 409, "CONFLICT");
        assert!(body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("last admin"));
        for role in ["developer", "viewer"] {
            let (status, body) = patch_role(&app, by, &f.project, &f.user_id, role).await;
            assert_error(status, &body, 409, "CONFLICT");
        }
    }
    // Nor by accepting an invitation to a lesser role.
    let (_, sent) = invite(&app, &f.token, &f.project, &f.email, "viewer").await;
    let id = sent["invite"]["id"].as_str().unwrap().to_string();
    let (status, body) = answer(&app, &f.token, &id, "accepted").await;
    assert_error(status, &body, 409, "CONFLICT");
    let (_, me) = app.call("GET", "/api/auth/me", Some(&f.token), None).await;
    assert_eq!(me["invites"][0]["status"], "pending", "rolled back: {me}");
    assert_eq!(admins_of(&app, &f).await, vec![f.user_id.clone()]);
    // Keeping the admin role is not a demotion.
    let (status, body) = patch_role(&app, &f.token, &f.project, &f.user_id, "admin").await;
    assert_eq!(status, 200, "{body}");

    // With a second admin the first may step down, and the second is then the last.
    let second = join(&app, &f, "admin").await;
    let (status, body) = patch_role(&app, &second.token, &f.project, &f.user_id, "developer").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["member"]["role"], "developer");
    assert_eq!(body["member"]["userId"], f.user_id.as_str());
    let (status, body) = remove(&app, &f.admin, &f.project, &second.user_id).await;
    assert_error(status, &body, 409, "CONFLICT");
    let (status, body) = remove(&app, &second.token, &f.project, &f.user_id).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({ "success": true }));
    assert_eq!(admins_of(&app, &f).await, vec![second.user_id.clone()]);
}

#[tokio::test]
async fn two_admins_demoting_each_other_at_once_leave_one_admin() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    let other = join(&app, &f, "admin").await;
    // The test holds the project's row lock that every membership change takes (`lock_team`),
    // so both demotions are in flight, each past its own admin check, before either may go on.
    let mut control = app.app.control.get().await.unwrap();
    let lock = control.transaction().await.unwrap();
    lock.query_one(
        "SELECT 1 FROM fluxbase.projects WHERE id = $1 FOR NO KEY UPDATE",
        &[&f.project],
    )
    .await
    .unwrap();
    let probe = app.app.control.get().await.unwrap();
    let release = async {
        until(Duration::from_secs(20), Duration::from_millis(20), || async {
            let waiting: i64 = probe
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity
                     WHERE datname = current_database() AND wait_event_type = 'Lock'
                       AND query LIKE 'SELECT 1 FROM fluxbase.projects WHERE id = $1 FOR NO KEY UPDATE%'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            if waiting == 2 {
                Ok(())
            } else {
                Err(format!("{waiting} of the 2 demotions wait on the project's lock"))
            }
        })
        .await;
        lock.commit().await.unwrap();
    };
    let ((s1, b1), (s2, b2), ()) = tokio::join!(
        patch_role(&app, &f.token, &f.project, &other.user_id, "viewer"),
        patch_role(&app, &other.token, &f.project, &f.user_id, "viewer"),
        release,
    );
    // One went first and demoted; the other then found its target the last admin.
    let (won, lost) = if s1 == 200 {
        ((s1, &b1), (s2, &b2))
    } else {
        ((s2, &b2), (s1, &b1))
    };
    assert_eq!(won.0, 200, "{b1} {b2}");
    assert_eq!(won.1["member"]["role"], "viewer", "{}", won.1);
    assert_error(lost.0, lost.1, 409, "CONFLICT");
    assert!(
        lost.1["error"]["message"]
            .as_str()
            .unwrap()
            .contains("last admin"),
        "{}",
        lost.1
    );
    let admins = admins_of(&app, &f).await;
    assert_eq!(admins.len(), 1, "{admins:?}");
    let survivor = if s1 == 200 {
        &f.user_id
    } else {
        &other.user_id
    };
    assert_eq!(&admins[0], survivor);
}

async fn run_sql(app: &TestApp, token: &str, project: &str, q: &str) -> (u16, Value) {
    app.call(
        "POST",
        "/api/execute-sql",
        Some(token),
        Some(json!({ "projectId": project, "query": q })),
    )
    .await
}

#[tokio::test]
async fn removed_and_demoted_members_lose_access_on_the_next_request() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    let dev = join(&app, &f, "developer").await;
    let (_, body) = run_sql(
        &app,
        &dev.token,
        &f.project,
        "CREATE TABLE notes (id int); SELECT current_user AS u",
    )
    .await;
    assert_eq!(body["success"], true, "{body}");
    assert_eq!(
        body["result"]["rows"][0]["u"],
        format!("fx_{}_owner", f.project)
    );

    let (status, body) = patch_role(&app, &f.token, &f.project, &dev.user_id, "viewer").await;
    assert_eq!(status, 200, "{body}");
    let (_, body) = run_sql(&app, &dev.token, &f.project, "INSERT INTO notes VALUES (1)").await;
    assert_eq!(body["error"]["code"], "SQL_EXEC_ERROR", "{body}");
    assert_eq!(body["error"]["details"], "ERROR:  42501");
    let (_, body) = run_sql(
        &app,
        &dev.token,
        &f.project,
        "SELECT current_user AS u, count(*) AS n FROM notes",
    )
    .await;
    assert_eq!(
        body["result"]["rows"][0]["u"],
        format!("fx_{}_read", f.project)
    );

    let (status, body) = remove(&app, &f.token, &f.project, &dev.user_id).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = run_sql(&app, &dev.token, &f.project, "SELECT 1").await;
    assert_error(status, &body, 404, "PROJECT_NOT_FOUND");
    let (_, me) = app
        .call("GET", "/api/auth/me", Some(&dev.token), None)
        .await;
    assert_eq!(me["projects"], json!([]));
    let (status, body) = remove(&app, &f.token, &f.project, &dev.user_id).await;
    assert_error(status, &body, 404, "NOT_FOUND");
    let (_, list) = team(&app, &f.token, &f.project).await;
    assert_eq!(list["members"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn a_removed_member_stops_receiving_realtime_events() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    let viewer = join(&app, &f, "viewer").await;
    app.rows(&f.admin, &f.project, "CREATE TABLE t (id int)")
        .await;
    let (status, body) = app
        .call(
            "POST",
            "/api/realtime/token",
            Some(&viewer.token),
            Some(json!({ "projectId": f.project })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let rt = body["token"].as_str().unwrap().to_string();

    let mut by_session = connect(&app, "/").await;
    let mut by_token = connect(&app, "/").await;
    let mut bystander = connect(&app, "/").await;
    for (ws, token) in [
        (&mut by_session, viewer.token.as_str()),
        (&mut by_token, rt.as_str()),
        (&mut bystander, f.read.as_str()),
    ] {
        let ack = subscribe(ws, &f.project, Some(token)).await;
        assert_eq!(ack["type"], "subscribed", "{ack}");
    }
    app.rows(&f.admin, &f.project, "INSERT INTO t VALUES (1)")
        .await;
    for ws in [&mut by_session, &mut by_token, &mut bystander] {
        let ev = recv(ws).await;
        assert_eq!(ev["payload"]["record"]["id"], 1, "{ev}");
    }

    let (status, body) = remove(&app, &f.token, &f.project, &viewer.user_id).await;
    assert_eq!(status, 200, "{body}");
    for ws in [&mut by_session, &mut by_token] {
        let msg = recv(ws).await;
        assert_eq!(msg["type"], "error", "{msg}");
        assert_eq!(msg["code"], "ACCESS_REVOKED", "{msg}");
    }
    app.rows(&f.admin, &f.project, "INSERT INTO t VALUES (2)")
        .await;
    let ev = recv(&mut bystander).await;
    assert_eq!(ev["payload"]["record"]["id"], 2, "{ev}");
    // The evicted sockets get nothing of it: the next thing they see answers a later ping.
    for ws in [&mut by_session, &mut by_token] {
        send(ws, json!({ "type": "broadcast", "roomId": format!("project_{}", f.project), "event": "x", "payload": {} })).await;
        let msg = recv(ws).await;
        assert_eq!(msg["code"], "NOT_SUBSCRIBED", "{msg}");
        send(ws, json!({ "type": "ping" })).await;
        assert_eq!(recv(ws).await, json!({ "type": "pong" }));
    }
    // Subscribing again is refused, with the session and with the token it obtained.
    let msg = subscribe(&mut by_session, &f.project, Some(&viewer.token)).await;
    assert_eq!(msg["code"], "PROJECT_NOT_FOUND", "{msg}");
    let msg = subscribe(&mut by_token, &f.project, Some(&rt)).await;
    assert_eq!(msg["code"], "ACCESS_REVOKED", "{msg}");
    send(&mut bystander, json!({ "type": "ping" })).await;
    assert_eq!(recv(&mut bystander).await, json!({ "type": "pong" }));
}

#[tokio::test]
async fn a_removal_announced_by_another_server_ends_the_members_subscriptions_here() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    let viewer = join(&app, &f, "viewer").await;
    let stays = join(&app, &f, "viewer").await;
    let mut gone_ws = connect(&app, "/").await;
    let mut stays_ws = connect(&app, "/").await;
    for (ws, token) in [(&mut gone_ws, &viewer.token), (&mut stays_ws, &stays.token)] {
        let ack = subscribe(ws, &f.project, Some(token)).await;
        assert_eq!(ack["type"], "subscribed", "{ack}");
    }
    // What another server does on removal: delete the row, then NOTIFY the access channel.
    let pg = crate::support::pg().await;
    let ctl = pg.client(&app.app.cluster.control_db).await;
    ctl.execute(
        "DELETE FROM fluxbase.members WHERE project_id = $1 AND user_id = $2",
        &[&f.project, &viewer.user_id],
    )
    .await
    .unwrap();
    for user in [&viewer.user_id, &stays.user_id] {
        // A stale announcement for someone who is still a member evicts nobody.
        ctl.execute(
            "SELECT pg_notify('fluxbase_cache', $1)",
            &[&format!("{} member-removed {user}", f.project)],
        )
        .await
        .unwrap();
    }
    let msg = recv(&mut gone_ws).await;
    assert_eq!(msg["code"], "ACCESS_REVOKED", "{msg}");
    app.rows(&f.admin, &f.project, "CREATE TABLE after_removal (id int)")
        .await;
    let msg = recv(&mut stays_ws).await;
    assert_eq!(msg["type"], "schema_update", "{msg}");
}

#[tokio::test]
async fn a_role_change_ends_the_members_subscriptions_until_they_subscribe_with_the_new_role() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    let dev = join(&app, &f, "developer").await;
    app.rows(&f.admin, &f.project, "CREATE TABLE t (id int)")
        .await;
    let rt = app
        .realtime_token(&dev.token, json!({ "projectId": f.project }))
        .await;
    let mut by_session = connect(&app, "/").await;
    let mut by_token = connect(&app, "/").await;
    let mut bystander = connect(&app, "/").await;
    for (ws, token) in [
        (&mut by_session, dev.token.as_str()),
        (&mut by_token, rt.as_str()),
        (&mut bystander, f.read.as_str()),
    ] {
        let ack = subscribe(ws, &f.project, Some(token)).await;
        assert_eq!(ack["type"], "subscribed", "{ack}");
    }

    // Demoted: the subscriptions made with the developer's rights end at once.
    let (status, body) = patch_role(&app, &f.token, &f.project, &dev.user_id, "viewer").await;
    assert_eq!(status, 200, "{body}");
    for ws in [&mut by_session, &mut by_token] {
        let msg = recv(ws).await;
        assert_eq!(msg["type"], "error", "{msg}");
        assert_eq!(msg["code"], "ACCESS_REVOKED", "{msg}");
        assert!(msg["message"].as_str().unwrap().contains("role"), "{msg}");
    }
    app.rows(&f.admin, &f.project, "INSERT INTO t VALUES (1)")
        .await;
    assert_eq!(recv(&mut bystander).await["payload"]["record"]["id"], 1);
    // The ended sockets got nothing of it: the next thing they see answers a later ping.
    for ws in [&mut by_session, &mut by_token] {
        send(ws, json!({ "type": "ping" })).await;
        assert_eq!(recv(ws).await, json!({ "type": "pong" }));
    }

    // Subscribing again works, with the viewer's rights: a viewer may not broadcast over REST,
    // and the token (which follows the member's current role) subscribes too.
    for (ws, token) in [
        (&mut by_session, dev.token.as_str()),
        (&mut by_token, rt.as_str()),
    ] {
        let ack = subscribe(ws, &f.project, Some(token)).await;
        assert_eq!(ack["type"], "subscribed", "{ack}");
    }
    app.rows(&f.admin, &f.project, "INSERT INTO t VALUES (2)")
        .await;
    for ws in [&mut by_session, &mut by_token, &mut bystander] {
        assert_eq!(recv(ws).await["payload"]["record"]["id"], 2);
    }

    // A role change announced by another server ends them here too (the row changed there).
    let pg = crate::support::pg().await;
    let ctl = pg.client(&app.app.cluster.control_db).await;
    ctl.execute(
        "UPDATE fluxbase.members SET role = 'developer' WHERE project_id = $1 AND user_id = $2",
        &[&f.project, &dev.user_id],
    )
    .await
    .unwrap();
    ctl.execute(
        "SELECT pg_notify('fluxbase_cache', $1)",
        &[&format!("{} member-changed {}", f.project, dev.user_id)],
    )
    .await
    .unwrap();
    for ws in [&mut by_session, &mut by_token] {
        let msg = recv(ws).await;
        assert_eq!(msg["code"], "ACCESS_REVOKED", "{msg}");
    }
    send(&mut bystander, json!({ "type": "ping" })).await;
    assert_eq!(recv(&mut bystander).await, json!({ "type": "pong" }));
}

#[tokio::test]
async fn turning_realtime_public_off_ends_the_subscriptions_made_without_a_token() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    app.rows(&f.admin, &f.project, "CREATE TABLE t (id int)")
        .await;
    app.make_realtime_public(&f).await;
    let mut anonymous = connect(&app, "/").await;
    let mut keyed = connect(&app, "/").await;
    send(
        &mut anonymous,
        json!({ "type": "subscribe", "roomId": format!("project_{}", f.project) }),
    )
    .await;
    assert_eq!(recv(&mut anonymous).await["type"], "subscribed");
    let ack = subscribe(&mut keyed, &f.project, Some(&f.read)).await;
    assert_eq!(ack["type"], "subscribed", "{ack}");

    let (status, body) = app
        .call(
            "PATCH",
            "/api/projects",
            Some(&f.token),
            Some(json!({ "projectId": f.project, "realtimePublic": false })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let msg = recv(&mut anonymous).await;
    assert_eq!(msg["code"], "ACCESS_REVOKED", "{msg}");
    app.rows(&f.admin, &f.project, "INSERT INTO t VALUES (1)")
        .await;
    assert_eq!(recv(&mut keyed).await["payload"]["record"]["id"], 1);
    send(&mut anonymous, json!({ "type": "ping" })).await;
    assert_eq!(recv(&mut anonymous).await, json!({ "type": "pong" }));
    // A new subscribe without a token is refused.
    send(
        &mut anonymous,
        json!({ "type": "subscribe", "roomId": format!("project_{}", f.project) }),
    )
    .await;
    assert_eq!(recv(&mut anonymous).await["code"], "AUTH_REQUIRED");

    // Announced by another server (its PATCH), it ends them here too.
    app.make_realtime_public(&f).await;
    send(
        &mut anonymous,
        json!({ "type": "subscribe", "roomId": format!("project_{}", f.project) }),
    )
    .await;
    assert_eq!(recv(&mut anonymous).await["type"], "subscribed");
    let pg = crate::support::pg().await;
    let ctl = pg.client(&app.app.cluster.control_db).await;
    ctl.execute(
        "UPDATE fluxbase.projects SET realtime_public = false WHERE id = $1",
        &[&f.project],
    )
    .await
    .unwrap();
    ctl.execute(
        "SELECT pg_notify('fluxbase_cache', $1)",
        &[&format!("{} public-closed", f.project)],
    )
    .await
    .unwrap();
    let msg = recv(&mut anonymous).await;
    assert_eq!(msg["code"], "ACCESS_REVOKED", "{msg}");
    send(&mut keyed, json!({ "type": "ping" })).await;
    assert_eq!(recv(&mut keyed).await, json!({ "type": "pong" }));
}

// ---------------------------------------------------------------------------------------------
// The role matrix: every member role and key scope against every endpoint family.
//
// To cover a new endpoint family (storage, RLS, ...): add a `Family` variant, its request in
// `attempt`, and a row in `MATRIX` saying who may use it. `attempt` returns whether the request
// was allowed; a refusal must be the right one (403 with INSUFFICIENT_PERMISSIONS or
// SCOPE_MISMATCH, or PostgreSQL's 42501 for SQL), anything else fails the test.
// ---------------------------------------------------------------------------------------------

/// Who calls: project members through their sessions, and the project's API keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Who {
    Viewer,
    Developer,
    AdminMember,
    ReadKey,
    ReadWriteKey,
    AdminKey,
}

const EVERYONE: [Who; 6] = [
    Who::Viewer,
    Who::Developer,
    Who::AdminMember,
    Who::ReadKey,
    Who::ReadWriteKey,
    Who::AdminKey,
];

#[derive(Clone, Copy, Debug)]
enum Family {
    SqlSelect,
    SqlInsert,
    SqlCreateTable,
    KeysList,
    KeysCreate,
    TeamList,
    TeamInvite,
    TeamPatch,
    WebhooksCreate,
    WebhooksList,
    ProjectPatch,
    RealtimeToken,
    RealtimeBroadcast,
    CdcStatus,
    RlsList,
    RlsCreate,
    /// Destructive: must stay the last row (see `attempt`).
    ProjectDelete,
}

use Who::*;

/// Who may use each family: the guide's table (admin everything; developer data and schemas
/// but not members or keys; viewer read-only) and the key scopes.
const MATRIX: &[(Family, &[Who])] = &[
    (Family::SqlSelect, &EVERYONE),
    (
        Family::SqlInsert,
        &[Developer, AdminMember, ReadWriteKey, AdminKey],
    ),
    (Family::SqlCreateTable, &[Developer, AdminMember, AdminKey]),
    (Family::KeysList, &[AdminMember, AdminKey]),
    (Family::KeysCreate, &[AdminMember, AdminKey]),
    (Family::TeamList, &[AdminMember, AdminKey]),
    (Family::TeamInvite, &[AdminMember, AdminKey]),
    (Family::TeamPatch, &[AdminMember, AdminKey]),
    (Family::WebhooksCreate, &[Developer, AdminMember, AdminKey]),
    (Family::WebhooksList, &EVERYONE),
    (Family::ProjectPatch, &[AdminMember, AdminKey]),
    (Family::RealtimeToken, &EVERYONE),
    (
        Family::RealtimeBroadcast,
        &[Developer, AdminMember, ReadWriteKey, AdminKey],
    ),
    (Family::CdcStatus, &EVERYONE),
    (Family::RlsList, &EVERYONE),
    (Family::RlsCreate, &[Developer, AdminMember, AdminKey]),
    (Family::ProjectDelete, &[AdminMember, AdminKey]),
];

struct Matrix {
    f: Fixture,
    viewer: Member,
    developer: Member,
    /// Someone to invite and re-role (a viewer member of the project).
    target: Member,
    /// A second project of the same admin, deleted by the admin key (the admin member deletes
    /// the first one last).
    spare: Fixture,
}

impl Matrix {
    fn token(&self, who: Who) -> &str {
        match who {
            Viewer => &self.viewer.token,
            Developer => &self.developer.token,
            AdminMember => &self.f.token,
            ReadKey => &self.f.read,
            ReadWriteKey => &self.f.readwrite,
            AdminKey => &self.f.admin,
        }
    }
}

/// Makes `who`'s request of `family`; true if it was allowed, false if refused as it should be.
async fn attempt(app: &TestApp, m: &Matrix, family: Family, who: Who) -> bool {
    let p = m.f.project.as_str();
    let token = m.token(who);
    let n = crate::support::unique("m");
    let (status, body) = match family {
        Family::SqlSelect | Family::SqlInsert | Family::SqlCreateTable => {
            let query = match family {
                Family::SqlSelect => "SELECT count(*) FROM matrix".to_string(),
                Family::SqlInsert => "INSERT INTO matrix VALUES (1)".to_string(),
                _ => format!("CREATE TABLE {n} (id int)"),
            };
            let body = app.sql(token, p, &query).await;
            if body["success"] == true {
                return true;
            }
            assert_eq!(
                body["error"]["details"], "ERROR:  42501",
                "{who:?} {family:?}: {body}"
            );
            return false;
        }
        Family::KeysList => {
            app.call(
                "GET",
                &format!("/api/keys?projectId={p}"),
                Some(token),
                None,
            )
            .await
        }
        Family::KeysCreate => {
            app.call(
                "POST",
                "/api/keys",
                Some(token),
                Some(json!({ "projectId": p, "scope": "read" })),
            )
            .await
        }
        Family::TeamList => team(app, token, p).await,
        Family::TeamInvite => invite(app, token, p, &m.target.email, "viewer").await,
        Family::TeamPatch => patch_role(app, token, p, &m.target.user_id, "viewer").await,
        Family::WebhooksCreate => {
            app.call(
                "POST",
                "/api/webhooks",
                Some(token),
                Some(json!({ "projectId": p, "url": "http://127.0.0.1:9/hook",
                             "events": ["row.inserted"], "tables": ["nothing_here"] })),
            )
            .await
        }
        Family::WebhooksList => {
            app.call(
                "GET",
                &format!("/api/webhooks?projectId={p}"),
                Some(token),
                None,
            )
            .await
        }
        Family::ProjectPatch => {
            app.call(
                "PATCH",
                "/api/projects",
                Some(token),
                Some(json!({ "projectId": p, "name": n })),
            )
            .await
        }
        Family::RealtimeToken => {
            app.call(
                "POST",
                "/api/realtime/token",
                Some(token),
                Some(json!({ "projectId": p })),
            )
            .await
        }
        Family::RealtimeBroadcast => {
            app.call(
                "POST",
                "/api/realtime/broadcast",
                Some(token),
                Some(json!({ "projectId": p, "event": "e", "payload": {} })),
            )
            .await
        }
        Family::CdcStatus => {
            app.call(
                "GET",
                &format!("/api/cdc/status?projectId={p}"),
                Some(token),
                None,
            )
            .await
        }
        Family::RlsList => {
            app.call(
                "GET",
                &format!("/api/rls/policies?projectId={p}"),
                Some(token),
                None,
            )
            .await
        }
        Family::RlsCreate => {
            app.call(
                "POST",
                "/api/rls/policies",
                Some(token),
                Some(json!({ "projectId": p, "table": "matrix", "name": n,
                             "command": "SELECT", "using": "true" })),
            )
            .await
        }
        Family::ProjectDelete => {
            // Refusals are tried on the real project; an allowed deletion by the admin key
            // removes the spare project (its own key), by the admin member the real one.
            let (project, token) = match who {
                AdminKey => (m.spare.project.as_str(), m.spare.admin.as_str()),
                _ => (p, token),
            };
            app.call(
                "DELETE",
                &format!("/api/projects?projectId={project}"),
                Some(token),
                None,
            )
            .await
        }
    };
    if (200..300).contains(&status) {
        assert_eq!(body["success"], true, "{who:?} {family:?}: {body}");
        return true;
    }
    assert_eq!(status, 403, "{who:?} {family:?}: {body}");
    let code = body["error"]["code"].as_str().unwrap_or_default();
    assert!(
        code == "INSUFFICIENT_PERMISSIONS" || code == "SCOPE_MISMATCH",
        "{who:?} {family:?}: {body}"
    );
    // Member refusals use the guide's code for roles.
    if matches!(who, Viewer | Developer) {
        assert_eq!(
            code, "INSUFFICIENT_PERMISSIONS",
            "{who:?} {family:?}: {body}"
        );
    }
    false
}

#[tokio::test]
async fn each_role_and_scope_may_do_exactly_what_the_role_table_says() {
    let app = spawn_app_with(|c| c.webhook_allow_private = true).await;
    let f = app.fixture().await;
    app.rows(&f.admin, &f.project, "CREATE TABLE matrix (id int)")
        .await;
    let viewer = join(&app, &f, "viewer").await;
    let developer = join(&app, &f, "developer").await;
    let target = join(&app, &f, "viewer").await;
    let (status, body) = app
        .call(
            "POST",
            "/api/projects",
            Some(&f.token),
            Some(json!({ "name": "spare" })),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let spare = Fixture {
        project: body["project"]["id"].as_str().unwrap().to_string(),
        admin: body["apiKeys"]["admin"].as_str().unwrap().to_string(),
        read: body["apiKeys"]["read"].as_str().unwrap().to_string(),
        readwrite: body["apiKeys"]["readwrite"].as_str().unwrap().to_string(),
        token: f.token.clone(),
        user_id: f.user_id.clone(),
        email: f.email.clone(),
    };
    let m = Matrix {
        f,
        viewer,
        developer,
        target,
        spare,
    };
    assert!(
        matches!(MATRIX.last(), Some((Family::ProjectDelete, _))),
        "ProjectDelete must stay last"
    );
    let mut wrong = Vec::new();
    for (family, allowed) in MATRIX {
        // Allowed deletions go last, so refusals are checked while the project exists.
        let mut order: Vec<Who> = EVERYONE.to_vec();
        order.sort_by_key(|w| allowed.contains(w));
        for who in order {
            let got = attempt(&app, &m, *family, who).await;
            if got != allowed.contains(&who) {
                wrong.push(format!("{family:?} by {who:?}: allowed={got}"));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "unexpected outcomes:\n{}",
        wrong.join("\n")
    );
}

/// A project always keeps an owner, an admin who chose the role (red team rt7 H1: the creator
/// made a viewer admin by a role change and left; the project then counted for no account, so
/// one puppet account's sign-up carried any number of projects past every per-account bound).
/// While only an admin made by a role change would remain, the owner can be neither removed
/// nor demoted, by anyone; ownership passes when another account accepts an admin invitation.
#[tokio::test]
async fn the_last_owner_stays_while_only_an_admin_made_by_a_role_change_would_remain() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    let pushed = join(&app, &f, "viewer").await;
    let (status, body) = patch_role(&app, &f.token, &f.project, &pushed.user_id, "admin").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["member"]["owner"], false, "{body}");
    // The listing says who owns it (the dashboard offers no removal of the last owner by it).
    assert_eq!(owners_of(&app, &f).await, vec![f.user_id.clone()]);
    let last_owner = crate::support::http::assert_last_owner;
    for by in [&f.token, &f.admin, &pushed.token] {
        let (status, body) = remove(&app, by, &f.project, &f.user_id).await;
        last_owner(status, &body);
        for role in ["developer", "viewer"] {
            let (status, body) = patch_role(&app, by, &f.project, &f.user_id, role).await;
            last_owner(status, &body);
        }
    }
    // Nor by accepting an invitation to a lesser role.
    let (_, sent) = invite(&app, &f.token, &f.project, &f.email, "developer").await;
    let id = sent["invite"]["id"].as_str().unwrap().to_string();
    let (status, body) = answer(&app, &f.token, &id, "accepted").await;
    last_owner(status, &body);
    // The admin made by a role change may still step down or be removed.
    let (status, body) = patch_role(&app, &f.token, &f.project, &pushed.user_id, "developer").await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = patch_role(&app, &f.token, &f.project, &pushed.user_id, "admin").await;
    assert_eq!(status, 200, "{body}");

    // An account that accepts an admin invitation becomes an owner: the first may then leave,
    // and the new one is the last owner in its turn.
    let heir = join(&app, &f, "admin").await;
    assert_eq!(
        owners_of(&app, &f).await,
        vec![f.user_id.clone(), heir.user_id.clone()]
    );
    let (status, body) = remove(&app, &heir.token, &f.project, &f.user_id).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = remove(&app, &pushed.token, &f.project, &heir.user_id).await;
    last_owner(status, &body);
    let (status, body) = patch_role(&app, &pushed.token, &f.project, &heir.user_id, "viewer").await;
    last_owner(status, &body);
}

/// Accepting an admin invitation makes an owner, whose account the project counts for: it takes
/// a place in the account's project quota as creating a project does (red team rt7: an account
/// at its quota accepted and was then charged past it).
#[tokio::test]
async fn accepting_an_admin_invitation_counts_against_the_project_quota() {
    let app = crate::support::spawn_app_with(|c| c.max_projects_per_user = 1).await;
    let f = app.fixture().await;
    let (token, user_id, email) = app.signup().await;
    let (status, body) = app
        .call(
            "POST",
            "/api/projects",
            Some(&token),
            Some(json!({ "name": "own" })),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let (_, sent) = invite(&app, &f.token, &f.project, &email, "admin").await;
    let id = sent["invite"]["id"].as_str().unwrap().to_string();
    let (status, body) = answer(&app, &token, &id, "accepted").await;
    assert_error(status, &body, 403, "INSUFFICIENT_PERMISSIONS");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_projects_per_user"),
        "{body}"
    );
    let (_, me) = app.call("GET", "/api/auth/me", Some(&token), None).await;
    assert_eq!(me["invites"][0]["status"], "pending", "rolled back: {me}");
    // Another role takes no place in the quota.
    let (_, sent) = invite(&app, &f.token, &f.project, &email, "developer").await;
    let id = sent["invite"]["id"].as_str().unwrap().to_string();
    let (status, body) = answer(&app, &token, &id, "accepted").await;
    assert_eq!(status, 200, "{body}");
    assert!(!admins_of(&app, &f).await.contains(&user_id));
}

/// Acceptances answered at once count against the quota one after another, and so does an
/// acceptance racing a creation (red team rt8 M1: four admin invitations accepted at once all
/// passed a quota of 2, and an acceptance beside a creation both passed).
#[tokio::test]
async fn acceptances_and_creations_at_once_never_pass_the_project_quota() {
    let app = crate::support::spawn_app_with(|c| c.max_projects_per_user = 2).await;
    let (token, _, email) = app.signup().await;
    let mut ids = Vec::new();
    for _ in 0..4 {
        let f = app.fixture().await;
        let (_, sent) = invite(&app, &f.token, &f.project, &email, "admin").await;
        ids.push(sent["invite"]["id"].as_str().unwrap().to_string());
    }
    let create = async {
        app.call(
            "POST",
            "/api/projects",
            Some(&token),
            Some(json!({ "name": "own" })),
        )
        .await
    };
    let accepts =
        futures_util::future::join_all(ids.iter().map(|id| answer(&app, &token, id, "accepted")));
    let ((created, _), answers) = tokio::join!(create, accepts);
    let mut passed = usize::from(created == 201);
    for (status, body) in &answers {
        match status {
            200 => passed += 1,
            _ => assert_error(*status, body, 403, "INSUFFICIENT_PERMISSIONS"),
        }
    }
    assert_eq!(passed, 2, "created {created}, accepted {answers:?}");
    let (_, listed) = app.call("GET", "/api/projects", Some(&token), None).await;
    let admin_of = listed["projects"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["role"] == "admin")
        .count();
    assert_eq!(admin_of, 2, "{listed}");
}

async fn withdraw(app: &TestApp, by: &str, project: &str, invite_id: &str) -> (u16, Value) {
    app.call(
        "DELETE",
        &format!("/api/team/invites?projectId={project}&inviteId={invite_id}"),
        Some(by),
        None,
    )
    .await
}

/// `by` invites `email` with `role`: the invitation's id.
async fn invited(app: &TestApp, by: &str, project: &str, email: &str, role: &str) -> String {
    let (status, body) = invite(app, by, project, email, role).await;
    assert_eq!(status, 201, "{body}");
    body["invite"]["id"].as_str().unwrap().to_string()
}

/// The listed invitation `id` (every field), if the project lists it.
async fn listed_invite(app: &TestApp, f: &Fixture, id: &str) -> Option<Value> {
    let (_, body) = team(app, &f.admin, &f.project).await;
    body["invites"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"] == id)
        .cloned()
}

/// The invitations `GET /api/auth/me` offers a session.
async fn offered(app: &TestApp, token: &str) -> Vec<Value> {
    let (status, body) = app.call("GET", "/api/auth/me", Some(token), None).await;
    assert_eq!(status, 200, "{body}");
    body["invites"].as_array().unwrap().clone()
}

/// Red team rt13 M1: an invitation could be neither withdrawn nor voided, so a member removed
/// (or demoted) came back as admin and owner by accepting one sent earlier, and the holder of a
/// leaked admin key deleted since still got in through the invitations it had sent. Now
/// removing a member or changing their role withdraws their pending invitations; an invitation
/// is accepted only while its sender vouches for it (a member still admin, an admin key live
/// and not rotated since), is listed with `answerable`, and an admin withdraws one with
/// `DELETE /api/team/invites`.
#[tokio::test]
async fn an_invitation_counts_only_while_its_sender_vouches_for_it_and_can_be_withdrawn() {
    let app = spawn_app().await;
    let f = app.fixture().await;

    // A member removed, or demoted, after an admin invitation was sent to them.
    for demoted in [false, true] {
        let bob = join(&app, &f, "developer").await;
        let id = invited(&app, &f.token, &f.project, &bob.email, "admin").await;
        let (status, body) = if demoted {
            patch_role(&app, &f.token, &f.project, &bob.user_id, "viewer").await
        } else {
            remove(&app, &f.token, &f.project, &bob.user_id).await
        };
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            listed_invite(&app, &f, &id).await,
            None,
            "withdrawn with the change"
        );
        let (status, body) = answer(&app, &bob.token, &id, "accepted").await;
        assert_error(status, &body, 404, "NOT_FOUND");
        assert!(!admins_of(&app, &f).await.contains(&bob.user_id));
    }

    // Sent with an admin key that is then revoked, or rotated: withdrawn with it (404), no
    // longer offered; sent again with the rotated key's new secret, accepted.
    for rotated in [false, true] {
        let (key_id, key) = app.new_key(&f, "admin", None).await;
        let (token, user_id, email) = app.signup().await;
        let id = invited(&app, &key, &f.project, &email, "admin").await;
        let listed = listed_invite(&app, &f, &id).await.unwrap();
        assert_eq!(listed["answerable"], true, "{listed}");
        assert_eq!(offered(&app, &token).await.len(), 1);
        let (status, body) = if rotated {
            app.call(
                "POST",
                "/api/keys/rotate",
                Some(&f.admin),
                Some(json!({ "projectId": f.project, "keyId": key_id })),
            )
            .await
        } else {
            app.call(
                "DELETE",
                &format!("/api/keys?projectId={}&keyId={key_id}", f.project),
                Some(&f.admin),
                None,
            )
            .await
        };
        assert_eq!(status, 200, "{body}");
        let rotated_secret = body["secret"].as_str().map(str::to_string);
        assert_eq!(listed_invite(&app, &f, &id).await, None);
        assert!(offered(&app, &token).await.is_empty());
        let (status, body) = answer(&app, &token, &id, "accepted").await;
        assert_error(status, &body, 404, "NOT_FOUND");
        assert!(!admins_of(&app, &f).await.contains(&user_id));
        if let Some(secret) = rotated_secret {
            let id = invited(&app, &secret, &f.project, &email, "admin").await;
            let (status, body) = answer(&app, &token, &id, "accepted").await;
            assert_eq!(status, 200, "{body}");
            assert!(admins_of(&app, &f).await.contains(&user_id));
        }
    }

    // Sent by a member who is then demoted: withdrawn with the demotion, and still void once
    // the member is made admin again (review of rt13's fix).
    let frank = join(&app, &f, "admin").await;
    let (gina_token, gina, gina_email) = app.signup().await;
    let id = invited(&app, &frank.token, &f.project, &gina_email, "developer").await;
    let (status, body) = patch_role(&app, &f.token, &f.project, &frank.user_id, "developer").await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = patch_role(&app, &f.token, &f.project, &frank.user_id, "admin").await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = answer(&app, &gina_token, &id, "accepted").await;
    assert_error(status, &body, 404, "NOT_FOUND");

    // The check at acceptance itself: a sender's standing changed outside this server's team
    // endpoints (here by hand in the control database) leaves its invitation listed but not
    // answerable: 409 naming why, and declining still works.
    let id = invited(&app, &frank.token, &f.project, &gina_email, "developer").await;
    let pg = crate::support::pg().await;
    let ctl = pg.client(&app.app.cluster.control_db).await;
    ctl.execute(
        "UPDATE fluxbase.members SET role = 'viewer' WHERE project_id = $1 AND user_id = $2",
        &[&f.project, &frank.user_id],
    )
    .await
    .unwrap();
    let listed = listed_invite(&app, &f, &id).await.unwrap();
    assert_eq!(
        (&listed["answerable"], &listed["status"]),
        (&json!(false), &json!("pending")),
        "{listed}"
    );
    assert!(offered(&app, &gina_token).await.is_empty());
    let (status, body) = answer(&app, &gina_token, &id, "accepted").await;
    assert_error(status, &body, 409, "CONFLICT");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no longer vouches"),
        "{body}"
    );
    let (status, body) = answer(&app, &gina_token, &id, "rejected").await;
    assert_eq!(status, 200, "declining needs no voucher: {body}");
    // Sent again by an admin: accepted.
    let id = invited(&app, &f.token, &f.project, &gina_email, "developer").await;
    let (status, body) = answer(&app, &gina_token, &id, "accepted").await;
    assert_eq!(status, 200, "{body}");
    assert!(members_where(&app, &f, |m| m["role"] == "developer")
        .await
        .contains(&gina));

    // Withdrawn by an admin: its id answers 404 to the invitee and to a second withdrawal;
    // nobody but an admin of the project may withdraw one.
    let (hank_token, _, hank_email) = app.signup().await;
    let id = invited(&app, &f.admin, &f.project, &hank_email, "viewer").await;
    let other = app.fixture().await;
    for by in [
        f.readwrite.as_str(),
        frank.token.as_str(),
        other.admin.as_str(),
    ] {
        let (status, body) = withdraw(&app, by, &f.project, &id).await;
        assert_eq!(status, 403, "{body}");
    }
    let (status, body) = withdraw(&app, &other.admin, &other.project, &id).await;
    assert_error(status, &body, 404, "NOT_FOUND");
    let (status, body) = withdraw(&app, &f.token, &f.project, &id).await;
    assert_eq!(
        (status, &body["success"], &body["status"]),
        (200, &json!(true), &json!("pending")),
        "{body}"
    );
    assert_eq!(listed_invite(&app, &f, &id).await, None);
    let (status, body) = answer(&app, &hank_token, &id, "accepted").await;
    assert_error(status, &body, 404, "NOT_FOUND");
    let (status, body) = withdraw(&app, &f.admin, &f.project, &id).await;
    assert_error(status, &body, 404, "NOT_FOUND");
}

/// An invitation lasts `invite_ttl_secs` (listed as `expiresAt`): accepting it later is 409,
/// and the invitee is no longer offered it.
#[tokio::test]
async fn an_invitation_expires_after_its_lifetime() {
    let app = spawn_app_with(|c| c.invite_ttl_secs = 2).await;
    let f = app.fixture().await;
    let (token, _, email) = app.signup().await;
    let id = invited(&app, &f.admin, &f.project, &email, "developer").await;
    let listed = listed_invite(&app, &f, &id).await.unwrap();
    let at = |field: &str| {
        chrono::DateTime::parse_from_rfc3339(listed[field].as_str().unwrap()).unwrap()
    };
    assert_eq!(
        (at("expiresAt") - at("invitedAt")).num_seconds(),
        2,
        "{listed}"
    );
    assert_eq!(offered(&app, &token).await.len(), 1);
    tokio::time::sleep(Duration::from_millis(2_300)).await;
    assert!(offered(&app, &token).await.is_empty());
    assert_eq!(
        listed_invite(&app, &f, &id).await.unwrap()["answerable"],
        false
    );
    let (status, body) = answer(&app, &token, &id, "accepted").await;
    assert_error(status, &body, 409, "CONFLICT");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("expired"),
        "{body}"
    );
    // A new one to the same address lasts again.
    let id = invited(&app, &f.admin, &f.project, &email, "developer").await;
    let (status, body) = answer(&app, &token, &id, "accepted").await;
    assert_eq!(status, 200, "{body}");
}

/// Red team rt13 LOW 1: a member who accepted an invitation to another role kept the realtime
/// subscriptions made with the old one (a PATCH ends them). Now the acceptance ends them too.
#[tokio::test]
async fn accepting_an_invitation_to_another_role_ends_the_members_subscriptions() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    let dev = join(&app, &f, "developer").await;
    let mut ws = connect(&app, "/").await;
    let ack = subscribe(&mut ws, &f.project, Some(&dev.token)).await;
    assert_eq!(ack["type"], "subscribed", "{ack}");
    let id = invited(&app, &f.token, &f.project, &dev.email, "viewer").await;
    let (status, body) = answer(&app, &dev.token, &id, "accepted").await;
    assert_eq!(status, 200, "{body}");
    let msg = recv(&mut ws).await;
    assert_eq!(msg["code"], "ACCESS_REVOKED", "{msg}");
}

/// Red team rt15 M1: an invitation sent by a request that authenticated with an admin key's
/// old secret just before a rotation committed was written after it, so a comparison of times
/// counted it for the new secret (accepted 5 times in 6). It carries the hash of the secret
/// that sent it now, and counts only while the key has that secret. Also L1: a key rotating
/// itself twice with the same secret gets 409 the second time, not a secret that voids the
/// first answer's.
#[tokio::test]
async fn a_request_authenticated_before_a_rotation_vouches_for_nothing_after_it() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    let (key_id, key) = app.new_key(&f, "admin", None).await;
    let (token, user_id, email) = app.signup().await;
    // The invitation is held between its authentication and its write: it reads the
    // invitee's account first (a rotation by another admin key reads no account).
    let holder = pg().await.client(&app.app.cluster.control_db).await;
    holder
        .batch_execute("BEGIN; LOCK TABLE fluxbase.users IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let watcher = pg().await.client(&app.app.cluster.control_db).await;
    let (sent, rotated) = tokio::join!(invite(&app, &key, &f.project, &email, "admin"), async {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let waiting: i64 = watcher
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity
                     WHERE wait_event_type = 'Lock'
                       AND query LIKE 'SELECT email FROM fluxbase.users%'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            if waiting > 0 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the invitation never waited"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let rotated = app
            .call(
                "POST",
                "/api/keys/rotate",
                Some(&f.admin),
                Some(json!({ "projectId": f.project, "keyId": key_id })),
            )
            .await;
        holder.batch_execute("COMMIT").await.unwrap();
        rotated
    });
    assert_eq!(rotated.0, 200, "{}", rotated.1);
    // The request was authenticated before the rotation: it is answered, but what it sent
    // counts for nothing.
    assert_eq!(sent.0, 201, "{}", sent.1);
    let id = sent.1["invite"]["id"].as_str().unwrap().to_string();
    let listed = listed_invite(&app, &f, &id).await.unwrap();
    assert_eq!(listed["answerable"], false, "{listed}");
    assert!(offered(&app, &token).await.is_empty());
    let (status, body) = answer(&app, &token, &id, "accepted").await;
    assert!(status >= 400, "{status} {body}");
    assert!(!admins_of(&app, &f).await.contains(&user_id));
    // Sent again with the new secret: it counts.
    let new_secret = rotated.1["secret"].as_str().unwrap().to_string();
    let id = invited(&app, &new_secret, &f.project, &email, "admin").await;
    let (status, body) = answer(&app, &token, &id, "accepted").await;
    assert_eq!(status, 200, "{body}");

    // L1: a key rotating itself twice at once, with the same secret: each replaces the secret
    // it presented, so one answers and the other 409s, both held at their write until both
    // have authenticated.
    let (self_id, own) = app.new_key(&f, "admin", None).await;
    let holder = pg().await.client(&app.app.cluster.control_db).await;
    holder
        .batch_execute(&format!(
            "BEGIN; SELECT 1 FROM fluxbase.api_keys WHERE id = '{self_id}' FOR UPDATE"
        ))
        .await
        .unwrap();
    let rotate_self = || {
        app.call(
            "POST",
            "/api/keys/rotate",
            Some(&own),
            Some(json!({ "projectId": f.project, "keyId": self_id })),
        )
    };
    let release = async {
        until(
            Duration::from_secs(20),
            Duration::from_millis(20),
            || async {
                let waiting: i64 = watcher
                    .query_one(
                        "SELECT count(*) FROM pg_stat_activity
                     WHERE wait_event_type = 'Lock'
                       AND query LIKE 'UPDATE fluxbase.api_keys SET key_hash%'",
                        &[],
                    )
                    .await
                    .unwrap()
                    .get(0);
                if waiting == 2 {
                    Ok(())
                } else {
                    Err(format!("{waiting} rotations wait"))
                }
            },
        )
        .await;
        holder.batch_execute("COMMIT").await.unwrap();
    };
    let (a, b, ()) = tokio::join!(rotate_self(), rotate_self(), release);
    let mut statuses = [a.0, b.0];
    statuses.sort();
    assert_eq!(statuses, [200, 409], "{} {}", a.1, b.1);
    let answered = if a.0 == 200 { &a.1 } else { &b.1 };
    let live = answered["secret"].as_str().unwrap().to_string();
    let (status, body) = team(&app, &live, &f.project).await;
    assert_eq!(status, 200, "the answered secret works: {body}");
    app.stop().await;
}
