// Invitations (outside projects): the signed-in user's pending invitations (from /api/auth/me)
// with Accept / Reject. After an answer the projects and invitations are reloaded and the page is
// drawn again (the top bar's badge too); an accepted invitation offers a link to its project.

import { h, mount, header, section, dataTable, when, confirmDialog, toast, act } from '../lib/dom.js';
import { get, post } from '../lib/api.js';

/** The answers given in this tab since it was loaded (memory only), so that the page drawn
 * again can say what happened: [{userId, projectId, projectName, role, status}]. */
const answered = [];
/** Set just before a redraw this page asked for, so that the redraw does not check again. */
let fresh = false;

function render(ctx, el) {
  const userId = ctx.user && ctx.user.id;
  const pending = ((ctx.me && ctx.me.invites) || []).filter((i) => i.status === 'pending');
  const mine = answered.filter((a) => a.userId === userId);

  async function answer(inv, status) {
    if (status === 'rejected') {
      const ok = await confirmDialog(`Reject the invitation to ${inv.projectName} as ${inv.role}? An admin of the project would have to invite you again.`,
        { confirmLabel: 'Reject invitation' });
      if (!ok) return;
    }
    try {
      await post('/api/team/invites/accept', { inviteId: inv.id, status });
    } catch (err) {
      // Answered elsewhere (409) or replaced by a newer invitation (404): show the fresh list.
      toast(`${err.code ? err.code + ': ' : ''}${err.message || err}`, 'error');
      await ctx.refreshProjects();
      fresh = true;
      ctx.rerender();
      return;
    }
    answered.unshift({ userId, projectId: inv.projectId, projectName: inv.projectName, role: inv.role, status });
    await ctx.refreshProjects();
    toast(status === 'accepted' ? `You joined ${inv.projectName} as ${inv.role}.` : `Invitation to ${inv.projectName} rejected.`, 'success');
    fresh = true;
    ctx.rerender();
  }

  const recent = mine.length ? section('Answered just now',
    h('ul', { class: 'answered' }, mine.map((a) => h('li', { 'data-answered': a.projectId, 'data-status': a.status },
      a.status === 'accepted'
        ? ['Accepted: you are now ', h('strong', {}, a.role), ' of ', h('strong', {}, a.projectName), '. ',
          (ctx.projects || []).some((p) => p.id === a.projectId)
            ? h('a', { href: `/projects/${a.projectId}/settings`, 'data-open-project': a.projectId }, `Open ${a.projectName}`)
            : null]
        : ['Rejected: ', h('strong', {}, a.projectName), ` (${a.role})`])))) : null;

  const list = dataTable([
    { key: 'projectName', label: 'Project', render: (i) => h('strong', {}, i.projectName) },
    { key: 'role', label: 'Role' },
    { key: 'invitedAt', label: 'Invited', render: (i) => when(i.invitedAt) },
    { key: 'actions', label: 'Answer', render: (i) => h('div', { class: 'row' },
      h('button', { type: 'button', class: 'small primary', 'data-accept': i.id, 'aria-label': `Accept the invitation to ${i.projectName}`, onclick: act(() => answer(i, 'accepted')) }, 'Accept'),
      h('button', { type: 'button', class: 'small danger', 'data-reject': i.id, 'aria-label': `Reject the invitation to ${i.projectName}`, onclick: act(() => answer(i, 'rejected')) }, 'Reject')) },
  ], pending, { empty: 'No pending invitations. When a project admin invites your email address, the invitation shows here.' });
  const rows = list.querySelectorAll('tbody tr');
  pending.forEach((i, n) => { if (rows[n]) { rows[n].dataset.invitation = i.id; rows[n].dataset.project = i.projectId; } });

  // The invitations were read at sign-in (or the last refresh): check for newer ones once per visit
  // and redraw (with the top bar's count) only when they differ.
  let alive = true;
  if (fresh) fresh = false;
  else {
    get('/api/auth/me').then(async (me) => {
      const ids = (list) => list.filter((i) => i.status === 'pending').map((i) => i.id).sort().join();
      if (!alive || ids(me.invites || []) === ids(pending)) return;
      await ctx.refreshProjects();
      if (!alive) return;
      fresh = true;
      ctx.rerender();
    }).catch(() => { /* the list shown stays; Refresh retries and shows an error */ });
  }

  mount(el,
    header('Invitations', 'Projects you are invited to join. Accepting makes you a member with the role shown.',
      h('button', { type: 'button', 'data-refresh-invites': '', onclick: act(async () => { await ctx.refreshProjects(); fresh = true; ctx.rerender(); }) }, 'Refresh')),
    recent,
    section('Pending', list));
  return () => { alive = false; };
}

export default {
  id: 'invitations',
  title: 'Invitations',
  group: 'Account',
  render,
};
