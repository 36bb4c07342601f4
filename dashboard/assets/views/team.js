// Team: the project's members and invitations. Admins invite a registered account (email and
// role), change a member's role and remove members; the API refuses to remove or demote the
// last admin or the last owner (409 CONFLICT), so that is not offered. Developers and viewers cannot list the team
// (403 INSUFFICIENT_PERMISSIONS): they get a note with their own role.

import { h, mount, field, header, section, errorBox, dataTable, when, confirmDialog, toast, act } from '../lib/dom.js';
import { get, post, patch, del } from '../lib/api.js';

export const ROLES = ['admin', 'developer', 'viewer'];
export const ROLE_HINT = {
  admin: 'everything: members, invitations, keys, settings and deletion, data and schemas',
  developer: 'data and schemas (SQL with DDL, webhooks, realtime broadcasts); not members or keys',
  viewer: 'read-only: SELECT, lists, realtime subscriptions',
};

function adminsOnly(ctx, el) {
  mount(el,
    header('Team', 'The project\'s members and invitations.'),
    h('section', { class: 'panel note', 'data-team-admins-only': '' },
      h('h2', {}, 'Only admins can see the team'),
      h('p', {}, 'Your role in ', h('strong', {}, ctx.project.name), ' is ',
        h('strong', { 'data-my-role': ctx.role }, ctx.role), ` (${ROLE_HINT[ctx.role] || ''}).`),
      h('p', { class: 'muted' }, 'A project admin invites members and changes their roles.')));
}

/** "email (Name)" as text (dialogs): the email, which the account proved, comes first, so that
 * a display name cannot pass for another member's ("alice <alice@t.io>" followed by blanks
 * pushed the real address out of sight: red team rt13). The server refuses text-direction
 * characters in names; an older one's are kept inside its own part by memberLabel(). */
function memberName(m) {
  return m.displayName ? `${m.email} (${m.displayName})` : m.email;
}

/** The same as isolated parts: the email whole on its line, the name below it, cut to the
 * column with an ellipsis (and whole in its tooltip). */
function memberLabel(m, me) {
  return h('span', { class: 'member-label' },
    h('bdi', { class: 'member-email' }, m.email),
    m.userId === me ? h('span', { class: 'you' }, ' (you)') : null,
    m.displayName ? h('bdi', { class: 'member-name muted', title: m.displayName }, m.displayName) : null);
}

/** A suspended project answers 403 PROJECT_SUSPENDED to every request naming it. */
function suspendedNote(ctx, el) {
  mount(el,
    header('Team'),
    h('section', { class: 'panel', 'data-team-suspended': '' },
      h('h2', {}, 'The project is suspended'),
      h('p', {}, 'The API refuses every request that names it (403 PROJECT_SUSPENDED), so the team cannot be listed or changed until the operator resumes it.')));
}

function render(ctx, el) {
  const p = ctx.project;
  if (!ctx.can.manage) return adminsOnly(ctx, el);
  if (p.status === 'suspended') return suspendedNote(ctx, el);
  const me = ctx.user && ctx.user.id;
  let alive = true;

  const members = h('div', { 'data-members': '' }, h('p', { class: 'loading' }, 'Loading members…'));
  const invites = h('div', { 'data-invites-list': '' }, h('p', { class: 'loading' }, 'Loading invitations…'));

  async function load() {
    let team;
    try {
      team = await get('/api/team', { projectId: p.id });
    } catch (err) {
      if (!alive) return;
      if (err.code === 'INSUFFICIENT_PERMISSIONS') return adminsOnly(ctx, el); // demoted meanwhile
      mount(members, errorBox(err), h('button', { type: 'button', onclick: act(load) }, 'Try again'));
      mount(invites);
      return;
    }
    if (!alive) return;
    const admins = team.members.filter((m) => m.role === 'admin').length;
    const owners = team.members.filter((m) => m.owner).length;
    const lockOf = (m) => locked(m, admins, owners);
    mount(members, dataTable([
      { key: 'member', label: 'Member', render: (m) => memberLabel(m, me) },
      { key: 'role', label: 'Role', render: (m) => roleCell(m, lockOf(m)) },
      { key: 'joinedAt', label: 'Joined', render: (m) => when(m.joinedAt) },
      { key: 'actions', label: 'Actions', render: (m) => removeCell(m, lockOf(m)) },
    ], team.members, { empty: 'No members.' }));
    tag(members, team.members, (tr, m) => { tr.dataset.member = m.email; tr.dataset.userId = m.userId; tr.dataset.role = m.role; });

    const sorted = [...team.invites].sort((a, b) => String(b.invitedAt).localeCompare(String(a.invitedAt)));
    mount(invites, dataTable([
      { key: 'email', label: 'Email' },
      { key: 'role', label: 'Role' },
      { key: 'invitedAt', label: 'Invited', render: (i) => when(i.invitedAt) },
      { key: 'status', label: 'Status', render: inviteStatus },
      { key: 'actions', label: 'Actions', render: withdrawCell },
    ], sorted, { empty: 'No invitations yet: invite a registered account above.' }));
    tag(invites, sorted, (tr, i) => { tr.dataset.invite = i.email; tr.dataset.status = i.status; tr.dataset.answerable = String(i.answerable); });
  }

  // A pending invitation that can no longer be accepted says why: expired, or its sender is no
  // longer an admin (a member demoted or removed, an admin key revoked or rotated).
  function inviteStatus(i) {
    const cell = h('span', { class: `invite-status ${i.status}` }, i.status);
    if (i.status !== 'pending') return cell;
    if (i.answerable) return h('span', {}, cell, h('small', { class: 'hint' }, ` until ${when(i.expiresAt)}`));
    const expired = new Date(i.expiresAt).getTime() <= Date.now();
    return h('span', {}, cell, h('small', { class: 'hint warn', 'data-unanswerable': '' },
      expired ? ' expired' : ' void: its sender no longer vouches for it (an admin removed or demoted, a key revoked or rotated)'));
  }

  function withdrawCell(i) {
    return h('button', {
      type: 'button', class: 'small danger', 'data-withdraw': i.email, 'aria-label': `Withdraw the invitation of ${i.email}`,
      onclick: act(async () => {
        const pending = i.status === 'pending';
        if (!await confirmDialog(pending
          ? `Withdraw the invitation of ${i.email}? It can no longer be accepted; invite them again to change your mind.`
          : `Remove the ${i.status} invitation of ${i.email} from the list? ${i.status === 'accepted' ? 'They stay a member.' : ''}`,
        { confirmLabel: pending ? 'Withdraw' : 'Remove' })) return;
        const answer = await del('/api/team/invites', { projectId: p.id, inviteId: i.id });
        toast(pending && answer.status === 'accepted'
          ? `${i.email} had accepted it already: they are a member (remove them from Members if need be).`
          : `Invitation of ${i.email} ${pending ? 'withdrawn' : 'removed'}.`, 'success');
        await load();
      }),
    }, i.status === 'pending' ? 'Withdraw' : 'Remove');
  }

  /**
   * The last admin, and the last owner (an admin who created the project or accepted an admin
   * invitation: the account the project counts for), can be neither demoted nor removed (409):
   * shown as text, no control. Which of the two, or null.
   */
  function locked(m, admins, owners) {
    if (m.role === 'admin' && admins <= 1) {
      return { label: 'last admin', why: 'The project\'s last admin: make another member admin first.' };
    }
    if (m.owner && owners <= 1) {
      return {
        label: 'last owner',
        why: 'The project\'s last owner, the account it counts for: invite another account as admin and have it accept first (an admin made by changing a role does not own the project).',
      };
    }
    return null;
  }

  function roleCell(m, lock) {
    if (lock) {
      return h('span', { class: 'role-locked', title: lock.why },
        m.role, h('span', { class: 'muted' }, ` (${lock.label})`));
    }
    // A select and a Save button (not a change listener: with the keyboard, each arrow key
    // would be a request).
    const select = h('select', {
      'aria-label': `Role of ${m.email}`, 'data-role-of': m.email,
      onchange: () => { save.disabled = select.value === m.role; },
    }, ROLES.map((r) => h('option', { value: r, selected: r === m.role }, r)));
    const save = h('button', {
      type: 'button', class: 'small', disabled: true, 'data-save-role': m.email, 'aria-label': `Save the role of ${m.email}`,
      onclick: act(async () => {
        const role = select.value;
        if (role === m.role) return;
        const self = m.userId === me;
        if (self && role !== 'admin') {
          const ok = await confirmDialog(`Make yourself ${role}? You will no longer be able to manage this project's members, keys or settings.`, { confirmLabel: `Become ${role}` });
          if (!ok) { select.value = m.role; save.disabled = true; return; }
        }
        try {
          await patch('/api/team', { projectId: p.id, userId: m.userId, role });
        } catch (err) {
          await load().catch(() => {}); // show the team as it is now
          throw err;
        }
        toast(`${m.email} is now ${role}.`, 'success');
        if (self) {
          await ctx.refreshProjects();
          ctx.rerender();
          return;
        }
        await load();
      }),
    }, 'Save');
    return h('div', { class: 'row role-edit' }, select, save);
  }

  function removeCell(m, lock) {
    if (lock) return h('span', { class: 'muted', title: lock.why }, '—');
    const self = m.userId === me;
    return h('button', {
      type: 'button', class: 'small danger', 'data-remove': m.email, 'aria-label': `Remove ${m.email}`,
      onclick: act(async () => {
        const ok = await confirmDialog(self
          ? `Leave ${p.name}? You lose access to it at once; another admin can invite you again.`
          : `Remove ${memberName(m)} from ${p.name}? They lose access at once (their realtime subscriptions end too).`,
        { confirmLabel: self ? 'Leave project' : 'Remove member' });
        if (!ok) return;
        await del('/api/team', { projectId: p.id, userId: m.userId });
        toast(`${m.email} removed.`, 'success');
        if (self) {
          await ctx.refreshProjects();
          ctx.navigate('/projects');
          return;
        }
        await load();
      }),
    }, self ? 'Leave' : 'Remove');
  }

  const email = h('input', { type: 'email', name: 'invite-email', required: true, maxLength: 254, autocomplete: 'off', placeholder: 'bob@acme.com' });
  const role = h('select', { name: 'invite-role', 'aria-describedby': 'invite-role-hint' }, ROLES.map((r) => h('option', { value: r, selected: r === 'developer' }, r)));
  const roleHint = h('small', { class: 'hint', id: 'invite-role-hint' }, ROLE_HINT.developer);
  role.addEventListener('change', () => { roleHint.textContent = ROLE_HINT[role.value]; });
  const inviteError = h('div', { class: 'form-error' });
  const inviteForm = h('form', {
    'aria-label': 'Invite a member', 'data-invite-form': '',
    onsubmit: act(async () => {
      mount(inviteError);
      try {
        const answer = await post('/api/team', { projectId: p.id, email: email.value.trim(), role: role.value });
        toast(`Invited ${answer.invite.email} as ${answer.invite.role}.`, 'success');
        email.value = '';
      } catch (err) {
        mount(inviteError, errorBox(err),
          err.code === 'USER_NOT_FOUND' ? h('p', { class: 'hint' }, 'Only registered accounts can be invited: ask them to sign up first.') : null);
        return;
      }
      await load();
    }),
  },
  h('div', { class: 'inline-form' },
    field('Email', email),
    field('Role', role),
    h('button', { type: 'submit', class: 'primary' }, 'Invite')),
  roleHint,
  inviteError,
  h('p', { class: 'hint' }, 'The account sees the invitation under Invitations and accepts or rejects it. Inviting the same address again replaces its earlier invitation.'));

  mount(el,
    header('Team', `Members of ${p.name} and their roles.`),
    section('Invite', inviteForm),
    section('Members', members),
    section('Invitations', invites));
  load();
  return () => { alive = false; };
}

/** Adds data-* attributes to a dataTable's body rows, in the rows' order. */
function tag(container, rows, f) {
  const trs = container.querySelectorAll('tbody tr');
  rows.forEach((r, i) => { if (trs[i]) f(trs[i], r); });
}

export default {
  id: 'team',
  title: 'Team',
  group: 'Project',
  render,
};
