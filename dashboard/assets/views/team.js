// PLACEHOLDER: to be written (issue 17).
import { h, mount, header } from '../lib/dom.js';

export default {
  id: 'team',
  title: 'Team',
  group: 'Project',
  render(ctx, el) {
    mount(el, header('Team'), h('p', {}, 'Not built yet.'));
  },
};
