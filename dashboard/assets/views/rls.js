// PLACEHOLDER: to be written (issue 17).
import { h, mount, header } from '../lib/dom.js';

export default {
  id: 'rls',
  title: 'Row Level Security',
  group: 'Database',
  render(ctx, el) {
    mount(el, header('Row Level Security'), h('p', {}, 'Not built yet.'));
  },
};
