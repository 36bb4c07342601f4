// The dashboard's entry: routing (paths, History API), the signed-in frame (project switcher,
// navigation, user menu) and the project views. Every view calls the public REST API only.

import { h, mount, toast, act } from './lib/dom.js';
import { get, post, session, clearSession, whenSignedOut } from './lib/api.js';
import { loginView, signupView } from './views/auth.js';
import { projectsView } from './views/projects.js';
import invitations from './views/invitations.js';
import settings from './views/settings.js';
import keys from './views/keys.js';
import team from './views/team.js';
import sqlEditor from './views/sql.js';
import tableEditor from './views/tables.js';
import rls from './views/rls.js';
import storage from './views/storage.js';
import webhooks from './views/webhooks.js';
import realtime from './views/realtime.js';
import health from './views/health.js';

/** The project views in navigation order. Each: {id, title, group, render(ctx, root)}; render
 * may return a function the app calls when the view is left (to close sockets, timers). */
export const VIEWS = [settings, keys, team, sqlEditor, tableEditor, rls, storage, webhooks, realtime, health];

const state = {
  me: null, // GET /api/auth/me: {user, projects:[{id,name,role}], invites}
  projects: [], // GET /api/projects: [{id,name,status,realtimePublic,createdAt,role}]
  leave: null, // the current view's cleanup
};

// ---- theme: the system's unless the user picked one (a preference, not a secret) ----
const THEME = 'fluxbase.theme';
function applyTheme() {
  const t = localStorage.getItem(THEME);
  if (t === 'dark' || t === 'light') document.documentElement.dataset.theme = t;
  else delete document.documentElement.dataset.theme;
}
function toggleTheme() {
  const dark = document.documentElement.dataset.theme
    ? document.documentElement.dataset.theme === 'dark'
    : matchMedia('(prefers-color-scheme: dark)').matches;
  localStorage.setItem(THEME, dark ? 'light' : 'dark');
  applyTheme();
}

// ---- routing ----
export function navigate(path, { replace = false } = {}) {
  if (replace) history.replaceState(null, '', path);
  else history.pushState(null, '', path);
  render();
}

document.addEventListener('click', (e) => {
  const a = e.target.closest && e.target.closest('a[href]');
  if (!a || a.target || a.hasAttribute('download') || e.button !== 0 || e.metaKey || e.ctrlKey || e.shiftKey || e.altKey) return;
  const u = new URL(a.href, location.href);
  if (u.origin !== location.origin || u.pathname.startsWith('/api/') || u.pathname.startsWith('/assets/')) return;
  e.preventDefault();
  navigate(u.pathname + u.search);
});
window.addEventListener('popstate', () => render());
whenSignedOut(() => {
  state.me = null;
  toast('Your session ended: sign in again.', 'error');
  navigate(`/login?next=${encodeURIComponent(location.pathname)}`, { replace: true });
});

/** Reloads the user's projects and invitations (after creating, renaming, joining…). */
export async function refreshProjects() {
  const [me, list] = await Promise.all([get('/api/auth/me'), get('/api/projects')]);
  state.me = me;
  state.projects = list.projects;
  return state.projects;
}

const root = () => document.getElementById('app');

async function render() {
  if (state.leave) {
    try { state.leave(); } catch (_) { /* a view's cleanup must not stop navigation */ }
    state.leave = null;
  }
  const path = location.pathname.replace(/\/+$/, '') || '/';
  const signedIn = !!session();
  if (path === '/login' || path === '/signup') {
    if (signedIn) return navigate('/projects', { replace: true });
    return mount(root(), path === '/login' ? loginView(afterSignIn) : signupView(afterSignIn));
  }
  if (!signedIn) return navigate(`/login${path === '/' ? '' : `?next=${encodeURIComponent(path)}`}`, { replace: true });
  if (!state.me) {
    mount(root(), h('p', { class: 'loading' }, 'Loading…'));
    try {
      await refreshProjects();
    } catch (e) {
      if (!session()) return undefined; // signed out: already redirected
      return mount(root(), h('main', { class: 'center' }, h('p', { role: 'alert' }, `Could not load your account: ${e.message}`)));
    }
  }
  if (path === '/' || path === '/projects') return frame(null, null, (el) => projectsView(ctxFor(null), el));
  if (path === '/invitations') return frame(null, null, (el) => invitations.render(ctxFor(null), el));
  const m = path.match(/^\/projects\/([^/]+)(?:\/([^/]+))?$/);
  if (m) {
    const project = state.projects.find((p) => p.id === m[1]);
    if (!project) {
      return frame(null, null, (el) => mount(el, h('div', { class: 'panel' },
        h('h1', {}, 'Project not found'),
        h('p', {}, 'This project does not exist or you are not one of its members.'),
        h('a', { href: '/projects' }, 'Your projects'))));
    }
    const view = VIEWS.find((v) => v.id === m[2]);
    if (!view) return navigate(`/projects/${project.id}/${VIEWS[0].id}`, { replace: true });
    return frame(project, view, (el) => view.render(ctxFor(project), el));
  }
  return frame(null, null, (el) => mount(el, h('div', { class: 'panel' }, h('h1', {}, 'Not found'), h('a', { href: '/projects' }, 'Your projects'))));
}

async function afterSignIn() {
  state.me = null;
  const next = new URLSearchParams(location.search).get('next');
  navigate(next && next.startsWith('/') && !next.startsWith('//') ? next : '/projects', { replace: true });
}

/** What a view gets: the project and the member's role, and what that role may do (as the API
 * decides: admins manage members, keys and settings; developers change data and schemas;
 * viewers read). */
function ctxFor(project) {
  const role = project ? project.role : null;
  return {
    project,
    role,
    user: state.me && state.me.user,
    me: state.me,
    projects: state.projects,
    can: { manage: role === 'admin', write: role === 'admin' || role === 'developer' },
    baseUrl: location.origin,
    wsUrl: `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}`,
    navigate,
    refreshProjects,
    rerender: render,
  };
}

function frame(project, view, fill) {
  const user = state.me.user;
  const pending = (state.me.invites || []).filter((i) => i.status === 'pending').length;
  const content = h('main', { id: 'main', class: 'content', tabindex: '-1' });
  const switcher = h('select', {
    'aria-label': 'Project', class: 'switcher',
    onchange: (e) => navigate(e.target.value ? `/projects/${e.target.value}/${view ? view.id : VIEWS[0].id}` : '/projects'),
  },
  h('option', { value: '' }, 'All projects'),
  state.projects.map((p) => h('option', { value: p.id, selected: project && p.id === project.id },
    p.name + (p.status === 'suspended' ? ' (suspended)' : ''))));
  const nav = project ? h('nav', { class: 'sidebar', 'aria-label': 'Project' },
    groups().map(([group, views]) => h('div', { class: 'nav-group' },
      h('h2', {}, group),
      h('ul', {}, views.map((v) => h('li', {}, h('a', {
        href: `/projects/${project.id}/${v.id}`, 'data-view': v.id,
        'aria-current': view && v.id === view.id ? 'page' : undefined,
      }, v.title))))))) : null;
  mount(root(),
    h('a', { class: 'skip', href: '#main', onclick: (e) => { e.preventDefault(); content.focus(); } }, 'Skip to content'),
    h('header', { class: 'topbar' },
      h('a', { class: 'brand', href: '/projects' }, h('img', { src: '/assets/logo.svg', alt: '' }), 'Fluxbase'),
      switcher,
      h('div', { class: 'spacer' }),
      h('a', { href: '/invitations', class: 'invites', 'data-invites': String(pending) }, 'Invitations', pending ? h('span', { class: 'badge' }, String(pending)) : null),
      h('button', { type: 'button', class: 'ghost', 'data-theme-toggle': '', onclick: toggleTheme, 'aria-label': 'Theme: switch between dark and light' }, 'Theme'),
      h('span', { class: 'user', title: user.email }, user.displayName || user.email),
      h('button', { type: 'button', class: 'ghost', 'data-logout': '', onclick: act(logout) }, 'Sign out')),
    h('div', { class: project ? 'layout' : 'layout single' }, nav,
      h('div', { class: 'content-wrap' },
        project && project.status === 'suspended'
          ? h('div', { class: 'banner warn', role: 'alert' }, 'This project is suspended: the API refuses every request that names it (403 PROJECT_SUSPENDED). Only the operator can resume it.')
          : null,
        content)));
  document.title = view ? `${view.title} · ${project.name} · Fluxbase` : 'Fluxbase';
  const leave = fill(content);
  if (typeof leave === 'function') state.leave = leave;
  return undefined;
}

function groups() {
  const out = [];
  for (const v of VIEWS) {
    let g = out.find(([name]) => name === v.group);
    if (!g) out.push(g = [v.group, []]);
    g[1].push(v);
  }
  return out;
}

async function logout() {
  try {
    await post('/api/auth/logout');
  } finally {
    clearSession();
    state.me = null;
    navigate('/login', { replace: true });
  }
}

applyTheme();
render();
