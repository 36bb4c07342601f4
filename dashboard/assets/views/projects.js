// Your projects: every project you are a member of, with your role and its state; create one.

import { h, mount, field, header, section, dataTable, when, dialog, secretBox, act } from '../lib/dom.js';
import { post } from '../lib/api.js';

export function projectsView(ctx, el) {
  const name = h('input', { name: 'name', type: 'text', required: true, maxLength: 100, placeholder: 'my-app' });
  const engine = h('select', { name: 'engine', 'data-field': 'engine' },
    h('option', { value: 'postgresql', selected: true }, 'PostgreSQL'),
    h('option', { value: 'mysql' }, 'MySQL (MariaDB)'));
  const create = h('form', {
    class: 'inline-form', 'aria-label': 'Create a project',
    onsubmit: act(async () => {
      const answer = await post('/api/projects', { name: name.value.trim(), engine: engine.value });
      name.value = '';
      await ctx.refreshProjects();
      await showKeys(answer);
      ctx.navigate(`/projects/${answer.project.id}/settings`);
    }),
  }, field('Project name', name), field('Database', engine), h('button', { type: 'submit', class: 'primary' }, 'Create project'));
  const projects = ctx.projects;
  mount(el,
    header('Projects', 'Every project you are a member of. Each has its own database: PostgreSQL, or MySQL (no row-level security).'),
    section('New project', create),
    section('Your projects', dataTable([
      { key: 'name', label: 'Name', render: (p) => h('a', { href: `/projects/${p.id}/settings`, 'data-project': p.id }, p.name) },
      { key: 'id', label: 'Project ID', render: (p) => h('code', {}, p.id) },
      { key: 'engine', label: 'Database', render: (p) => h('span', { class: `engine ${p.engine}` }, p.engine === 'mysql' ? 'MySQL' : 'PostgreSQL') },
      { key: 'role', label: 'Your role' },
      { key: 'status', label: 'Status', render: (p) => h('span', { class: `status ${p.status}` }, p.status) },
      { key: 'createdAt', label: 'Created', render: (p) => when(p.createdAt) },
    ], projects, { empty: 'No projects yet: create one above, or accept an invitation.' })));
}

/** The three keys a new project comes with, shown once (the page keeps none of them). */
async function showKeys(answer) {
  await dialog({
    title: `Project ${answer.project.name} created`,
    body: h('div', {},
      h('p', {}, 'It comes with one API key per scope for your backends. The dashboard itself never uses them.'),
      ['read', 'readwrite', 'admin'].map((scope) => h('div', { class: 'key-once', 'data-scope': scope },
        h('h3', {}, `${scope} key`), secretBox(answer.apiKeys[scope], `The ${scope} key`)))),
    actions: [{ label: 'Done', value: 'done', class: 'primary' }],
  });
}
